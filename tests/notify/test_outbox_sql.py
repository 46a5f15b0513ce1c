"""The outbox's rules in SQL (functions/60_notify.sql) on a real Postgres: what is written,
once, and with whom."""

from __future__ import annotations

import json

import pytest

from tests.conftest import add_user
from vtai.admin.reports import set_tier
from vtai.db.connection import Database
from vtai.notify import outbox, report
from vtai.settings import Settings


@pytest.fixture
def add_user_on():
    async def make(conn, tier: str = "free"):
        return await add_user(conn, tier=tier)

    return make


async def _events(conn, type_: str) -> list[dict]:
    rows = await conn.fetch(
        "select id, payload::text as payload from webhook_events where type = $1"
        " order by created_at",
        type_,
    )
    return [{"id": r["id"], **json.loads(r["payload"])} for r in rows]


async def test_outbox_add_writes_nothing_when_off_and_once_per_dedupe_key_per_url(conn):
    assert await conn.fetchval("select vtai_outbox_add('ledger.drift', '{}', 'k1')") is None
    assert await conn.fetchval("select count(*) from webhook_events") == 0
    await conn.fetchval("select vtai_webhook_endpoints_set($1)", ["http://a/1", "http://b/2"])
    first = await conn.fetchval("select vtai_outbox_add('ledger.drift', '{\"x\":1}', 'k1')")
    again = await conn.fetchval("select vtai_outbox_add('ledger.drift', '{\"x\":2}', 'k1')")
    assert first is not None and again == first
    assert await conn.fetchval("select count(*) from webhook_deliveries") == 2
    # A URL dropped from VTAI_WEBHOOK_URLS gets no new events.
    await conn.fetchval("select vtai_webhook_endpoints_set($1)", ["http://a/1"])
    await conn.fetchval("select vtai_outbox_add('ledger.drift', '{}', null)")
    assert await conn.fetchval("select count(*) from webhook_deliveries") == 3
    # A low balance: once per provider and UTC day; a balance above the threshold, none.
    low = "select vtai_balance_low('openrouter', $1, 'USD', 5)"
    assert await conn.fetchval(low, 3) == await conn.fetchval(low, 2) is not None
    assert await conn.fetchval(low, 7) is None


async def test_refusal_events_once_per_user_cap_and_period(conn, add_user_on):
    await conn.fetchval("select vtai_webhook_endpoints_set($1)", ["http://a/1"])
    user = await add_user_on(conn)
    results = [
        await conn.fetchval("select vtai_quota_refused($1, 'month', now(), $2)", user.id, reason)
        for reason in ("quota_exhausted", "prompt_exceeds_quota", "quota_exhausted",
                       "daily_exhausted", "rate_limited")
    ]  # fmt: skip
    assert results == [True, False, False, True, False]
    events = await _events(conn, "quota.refused")
    assert [(e["cap"], e["reason"]) for e in events] == [
        ("tokens", "quota_exhausted"),
        ("daily", "daily_exhausted"),
    ]
    # Another period is another event.
    assert await conn.fetchval(
        "select vtai_quota_refused($1, 'month', now() + interval '40 days', 'quota_exhausted')",
        user.id,
    )


async def test_tier_changed_carries_the_actor_of_the_audit_row(db_url, conn, add_user_on, tmp_path):
    await conn.fetchval("select vtai_webhook_endpoints_set($1)", ["http://a/1"])
    user = await add_user_on(conn)
    db = await Database(Settings(database_url=db_url, data_dir=tmp_path), pool_size=2).open()
    try:
        await set_tier(db.pool, user.id, "basic", "alice-admin")
    finally:
        await db.close()
    await conn.execute("update profiles set tier = 'premium' where id = $1", user.id)
    await conn.execute("update profiles set tier = 'premium' where id = $1", user.id)  # no change
    events = await _events(conn, "tier.changed")
    assert [(e["from"], e["to"], e["actor"]) for e in events] == [
        ("free", "basic", "alice-admin"),
        ("basic", "premium", f"sql:{await conn.fetchval('select session_user')}"),
    ]
    assert events[0]["audit_id"] is not None and events[0]["username"] == user.username


async def test_a_failed_send_backs_off_and_a_late_answer_does_not_move_a_reclaimed_row(conn):
    await conn.fetchval("select vtai_webhook_endpoints_set($1)", ["http://a/1"])
    calls = outbox.PoolCalls(conn)  # one connection works as a pool here
    event = await outbox.add(calls, "test.event", {"n": 1})
    (first,) = await outbox.claim(calls, 10, 0.05)
    assert first.event_id == event and first.attempt == 1
    assert await outbox.claim(calls, 10, 60) == []  # leased
    await conn.execute("select pg_sleep(0.06)")
    (second,) = await outbox.claim(calls, 10, 60)  # the lease ran out: due again
    assert second.attempt == 2
    assert await outbox.done(calls, first, 500, "HTTP 500", 1) == "stale"
    assert await outbox.done(calls, second, None, "ConnectError", 1) == "retry"
    wait = await conn.fetchval(
        "select extract(epoch from next_attempt_at - now()) from webhook_deliveries"
    )
    assert 1.5 < wait <= 2.0  # 1 s x 2^(2 - 1)
    (status,) = await outbox.status(calls)
    assert (status["failing"], status["delivered"]) == (1, 0)
    assert status["last_error"] == "ConnectError"
    said = "\n".join(report.lines(await report.gather(calls, None, ("http://a/1",))))
    assert "http://a/1: active; 0 delivered, 0 pending, 1 failing (retried), 0 given up" in said
    assert "test.event" in said and "ConnectError" in said
    assert await outbox.retry(calls) == 1
    (third,) = await outbox.claim(calls, 10, 60)
    assert await outbox.done(calls, third, 204, None, 1) == "delivered"
    (status,) = await outbox.status(calls)
    assert (status["failing"], status["delivered"]) == (0, 1)
