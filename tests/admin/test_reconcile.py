"""The ledger against the bill, on a real Postgres, with OpenRouter's credits answered by the
FAKE balance API (tests/fake_balance_api.py: OpenRouter can't be reached from here).

Snapshots are taken by the real balance sync against the fake; each is then moved back in time,
because a test can't wait a day between two of them.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from tests import fake_balance_api
from tests.admin.test_routes import SECRET, sign_in
from tests.conftest import add_user
from tests.fake_balance_api import FakeBalanceApi
from vtai.admin import balances, reconcile
from vtai.admin import routes as admin
from vtai.settings import Settings, SettingsError, load_settings

KEY = "sk-or-v1-test-secret-key-0123456789"
OPENROUTER = "openrouter/openai/gpt-4o-mini"
# The day reconciled: two days ago, so that every time below has passed.
DAY = datetime.now(UTC).date() - timedelta(days=2)


def at(day: date, hh: int, mm: int = 0) -> datetime:
    return datetime.combine(day, time(hh, mm), tzinfo=UTC)


START = at(DAY - timedelta(days=1), 23, 30)  # the snapshot before the day
END = at(DAY, 23, 45)  # the snapshot that closes it


def rules(percent: str, min_usd: str) -> Settings:
    return Settings(drift_alert_percent=Decimal(percent), drift_alert_min_usd=Decimal(min_usd))


@pytest.fixture(scope="module")
def api():
    a = FakeBalanceApi().start()
    yield a
    a.stop()


@pytest.fixture
async def pool(db_url):
    p = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    yield p
    await p.close()


async def ledger(conn, created: datetime, model: str, provider: str, cost: str, source="chat"):
    await conn.execute(
        "insert into request_logs (litellm_call_id, created_at, model, provider, status,"
        " total_cost, source) values ($1, $2, $3, $4, 'success', $5, $6)",
        str(uuid.uuid4()),
        created,
        model,
        provider,
        Decimal(cost),
        source,
    )


async def fake_api_snapshot(pool, conn, api, usage: float, taken_at: datetime, monkeypatch):
    """A real balance sync against the FAKE credits endpoint, its snapshot moved to taken_at."""
    monkeypatch.setitem(fake_balance_api.CREDITS["data"], "total_usage", usage)
    env = {"OPENROUTER_API_KEY": KEY, "VTAI_OPENROUTER_BASE": api.url("ok")}
    await balances.sync(pool, env)
    await conn.execute(
        "update provider_spend_snapshots set taken_at = $1"
        " where id = (select max(id) from provider_spend_snapshots)",
        taken_at,
    )


async def drift_events(conn) -> list:
    return await conn.fetch("select id, payload from webhook_events where type = 'ledger.drift'")


async def test_fake_api_snapshots_a_day_apart_give_the_drift_and_one_alert(
    api, pool, conn, monkeypatch
):
    await conn.execute("select vtai_webhook_endpoints_set(array['http://127.0.0.1:9/hook'])")
    await fake_api_snapshot(pool, conn, api, 5.25, START, monkeypatch)
    await fake_api_snapshot(pool, conn, api, 7.25, END, monkeypatch)  # OpenRouter billed $2.00
    await ledger(conn, START - timedelta(minutes=5), OPENROUTER, "openrouter", "3")  # before
    await ledger(conn, at(DAY, 0, 10), OPENROUTER, "openrouter", "1.00")
    await ledger(conn, at(DAY, 12), OPENROUTER, "openrouter", "0.90")
    await ledger(conn, at(DAY, 13), OPENROUTER, "openrouter", "0.50", source="probe")
    await ledger(conn, END + timedelta(minutes=5), OPENROUTER, "openrouter", "4")  # after
    await ledger(conn, at(DAY, 10), "gpt-4o-mini", "openai", "0.30")
    await ledger(conn, at(DAY, 11), "local/smollm2-135m", "local", "0")

    # The daily run: drift -5% is under 10%, so no alert.
    due = await reconcile.run_due(pool, rules("10", "0.05"))
    by = {(r["provider"], r["day"]): r for r in due}
    row = by["openrouter", DAY]
    assert (row["window_start"], row["window_end"]) == (START, END)
    assert row["ledger_usd"] == Decimal("1.90") and row["provider_usd"] == Decimal("2.00")
    assert row["drift_usd"] == Decimal("-0.10") and row["drift_percent"] == Decimal("-5")
    assert row["alert"] is False and await drift_events(conn) == []
    # The providers without a spend API say so, with the ledger's figure and no provider's.
    openai, local = by["openai", DAY], by["local", DAY]
    assert openai["ledger_usd"] == Decimal("0.30") and openai["provider_usd"] is None
    assert openai["note"].startswith("no spend API") and openai["drift_percent"] is None
    assert local["provider_usd"] is None and "locally" in local["note"]
    # A day is reconciled once by the daily run.
    assert await reconcile.run_due(pool, rules("10", "0.05")) == []

    # 5% of the bill, but $0.10 is under the $0.50 minimum: pennies don't alert.
    (row,) = [
        r
        for r in await reconcile.run_day(pool, DAY, rules("5", "0.50"))
        if r["provider"] == "openrouter"
    ]
    assert row["alert"] is False and await drift_events(conn) == []
    # Past both: one ledger.drift event, written with the row; a recomputation adds none.
    for _ in range(2):
        (row,) = [
            r
            for r in await reconcile.run_day(pool, DAY, rules("5", "0.05"))
            if r["provider"] == "openrouter"
        ]
        assert row["alert"] is True
        (event,) = await drift_events(conn)
        assert row["alert_event"] == event["id"]
    payload = json.loads(event["payload"], parse_float=Decimal)
    assert payload["provider"] == "openrouter" and payload["day"] == DAY.isoformat()
    assert payload["drift_percent"] == Decimal("-5") and payload["provider_usd"] == Decimal(2)


async def test_reconciles_without_the_outbox_function(pool, conn):
    """Before the outbox's function is installed (or once it is dropped), a drift still stores
    its row and alert; there is just no event."""
    await conn.execute("drop function public.vtai_outbox_add(text, jsonb, text)")
    await conn.executemany(
        "insert into provider_spend_snapshots (provider, usage, taken_at) values ('openrouter',"
        " $1, $2)",
        [(Decimal(1), START), (Decimal(4), END)],
    )
    await ledger(conn, at(DAY, 9), OPENROUTER, "openrouter", "1")
    (row,) = await reconcile.run_day(pool, DAY, rules("5", "1"))
    assert row["provider_usd"] == Decimal(3) and row["drift_percent"] == Decimal("-66.6667")
    assert row["alert"] is True and row["alert_event"] is None


async def test_admin_route_returns_the_table(pool, conn, monkeypatch):
    monkeypatch.setenv("CHAINLIT_AUTH_SECRET", SECRET)
    monkeypatch.delenv("VTAI_DRIFT_ALERT_PERCENT", raising=False)
    await conn.executemany(
        "insert into provider_spend_snapshots (provider, usage, taken_at) values ('openrouter',"
        " $1, $2)",
        [(Decimal(1), START), (Decimal(2), END)],
    )
    await ledger(conn, at(DAY, 9), OPENROUTER, "openrouter", "1")
    await ledger(conn, at(DAY, 9), "claude-3-5-haiku-latest", "anthropic", "0.25")
    # A key set for a provider without a spend API, no ledger rows: listed, saying so.
    await balances.store(pool, [balances.Fetched("gemini", note=balances.NO_API)])
    await reconcile.run_due(pool, rules("5", "1"))
    app = FastAPI()
    admin.register(app, get_pool=lambda: pool, get_period=lambda: "month")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver"
    ) as client:
        assert (await client.get("/admin/api/reconciliation")).status_code == 401
        sign_in(client, await add_user(conn, "boss", admin=True))
        assert (await client.get("/admin/api/reconciliation?days=0")).status_code == 400
        r = await client.get("/admin/api/reconciliation")
    assert r.status_code == 200
    body = r.json()
    rows = {x["provider"]: x for x in body["rows"]}
    assert rows["openrouter"]["day"] == DAY.isoformat()
    assert rows["openrouter"]["ledger_usd"] == "1.00000000"
    assert rows["openrouter"]["drift_percent"] == "0.0000"
    assert rows["anthropic"]["provider_usd"] is None and "invoice" in rows["anthropic"]["note"]
    providers = {p["provider"]: p for p in body["providers"]}
    assert providers["openrouter"] == {"provider": "openrouter", "spend_api": True, "note": None}
    assert not providers["gemini"]["spend_api"] and "no spend API" in providers["gemini"]["note"]
    assert body["alert_percent"] == "5"


def test_drift_settings_are_one_line_each():
    s = load_settings({"VTAI_DRIFT_ALERT_PERCENT": "2.5"}, dotenv=False)
    assert s.drift_alert_percent == Decimal("2.5") and s.drift_alert_min_usd == Decimal("1.00")
    with pytest.raises(SettingsError, match=r"^VTAI_DRIFT_ALERT_MIN_USD: 'lots' is not a number$"):
        load_settings({"VTAI_DRIFT_ALERT_MIN_USD": "lots"}, dotenv=False)
