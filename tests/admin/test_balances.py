"""Provider balances against a FAKE OpenRouter credits endpoint (tests/fake_balance_api.py)."""

from __future__ import annotations

import asyncio
import logging
from decimal import Decimal

import asyncpg
import pytest

from tests.fake_balance_api import FakeBalanceApi
from vtai.admin import balances

KEY = "sk-or-v1-test-secret-key-0123456789"


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


def env(api, mode, **extra):
    return {"OPENROUTER_API_KEY": KEY, "VTAI_OPENROUTER_BASE": api.url(mode), **extra}


async def stored(conn, provider="openrouter"):
    return await conn.fetchrow("select * from provider_balances where provider = $1", provider)


async def test_success_records_credits_minus_usage(api, pool, conn):
    rows = await balances.sync(pool, env(api, "ok"))
    assert [r["provider"] for r in rows] == ["openrouter"]
    row = await stored(conn)
    assert row["balance"] == Decimal("20.25") and row["currency"] == "USD"
    assert row["fetched_at"] is not None and row["error"] is None
    assert api.auth_headers[-1] == f"Bearer {KEY}"


@pytest.mark.parametrize(
    ("mode", "says"),
    [("500", "HTTP 500"), ("hang", "timed out"), ("garbage", "unexpected answer"), ("401", "401")],
)
async def test_failure_keeps_last_balance_and_records_error(api, pool, conn, mode, says, caplog):
    await balances.sync(pool, env(api, "ok"))
    good = await stored(conn)
    with caplog.at_level(logging.DEBUG):
        await balances.sync(pool, env(api, mode), timeout=0.5)
    row = await stored(conn)
    assert row["balance"] == good["balance"] and row["fetched_at"] == good["fetched_at"]
    assert says in row["error"] and row["error_at"] is not None
    assert KEY not in row["error"] and KEY not in caplog.text
    # the next good sync clears the error
    await balances.sync(pool, env(api, "ok"))
    assert (await stored(conn))["error"] is None


async def test_first_sync_failing_stores_the_error_without_a_balance(api, pool, conn):
    await balances.sync(pool, env(api, "500"))
    row = await stored(conn)
    assert row["balance"] is None and row["fetched_at"] is None and "HTTP 500" in row["error"]


async def test_providers_without_a_balance_api_say_so(pool, conn):
    rows = await balances.sync(
        pool, {"OPENAI_API_KEY": "sk-x", "ANTHROPIC_API_KEY": "sk-y", "GEMINI_API_KEY": ""}
    )
    assert [r["provider"] for r in rows] == ["anthropic", "openai"]
    for r in rows:
        assert r["balance"] is None and "no API" in r["note"] and r["error"] is None
    # no key, no fetch: nothing is recorded and nothing is called
    assert await stored(conn) is None


async def test_chainlit_fake_openai_key_does_not_count(pool):
    assert await balances.sync(pool, {"OPENAI_API_KEY": "sk-FAKE-OPENAI-API-KEY"}) == []


@pytest.mark.parametrize("role", ["anon", "authenticated"])
async def test_user_roles_cannot_read_balances(pool, conn, role):
    await balances.store(pool, [balances.Fetched("openrouter", Decimal(1), "USD")])
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with conn.transaction():
            await conn.execute(f"set local role {role}")
            await conn.fetch("select * from provider_balances")


async def test_cli_sync_prints_one_line_per_provider(api, pool, capsys, monkeypatch):
    for k, v in env(api, "ok").items():
        monkeypatch.setenv(k, v)
    for k in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY"):
        monkeypatch.delenv(k, raising=False)
    assert await balances.cli_sync(pool) == 0
    out = capsys.readouterr().out
    assert "openrouter: 20.25 USD" in out and KEY not in out
    monkeypatch.setenv("VTAI_OPENROUTER_BASE", api.url("500"))
    assert await balances.cli_sync(pool) == 1
    assert "last sync failed" in capsys.readouterr().out


async def test_periodic_task_syncs_and_stops(api, pool, conn, monkeypatch):
    for k, v in env(api, "ok").items():
        monkeypatch.setenv(k, v)
    task = balances.start_periodic(pool, every=3600)
    for _ in range(100):
        if await stored(conn):
            break
        await asyncio.sleep(0.05)
    await balances.stop_periodic(task)
    assert task.done() and (await stored(conn))["balance"] == Decimal("20.25")
    assert balances.start_periodic(pool, every=0) is None
    assert balances.interval({"VTAI_BALANCE_SYNC_INTERVAL": "0"}) == 0
    assert balances.interval({}) == balances.DEFAULT_INTERVAL
