"""VTAI_USAGE_PERIOD=billing (issue #19 item 5) on a real Postgres: a subscriber's period runs
from their Stripe subscription's current period start to its end, and moves on by itself when
the webhook that would have said so is late; everyone else keeps the calendar month."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import asyncpg
import pytest

from tests.metering.test_plans import member, plan
from vtai.metering.gate import Gate, usage_of
from vtai.metering.postgres import PostgresStore


def at(*parts) -> datetime:
    return datetime(*parts, tzinfo=UTC)


@pytest.fixture
async def pool(db_url):
    p = await asyncpg.create_pool(db_url, min_size=1, max_size=5)
    yield p
    await p.close()


async def subscribe(conn, user, start, end, status="active") -> None:
    await conn.execute(
        "insert into billing_subscriptions (subscription_id, user_id, customer_id, status, tier,"
        " current_period_start, current_period_end, event_created)"
        " values ($1, $2, 'cus_test', $3, 'premium', $4, $5, $4)",
        f"sub_{uuid.uuid4().hex[:12]}",
        user.id,
        status,
        start,
        end,
    )


async def period(conn, user, when) -> tuple[datetime, datetime]:
    row = await conn.fetchrow("select * from vtai_user_period($1, 'billing', $2)", user.id, when)
    return row["period_start"], row["period_end"]


async def test_without_a_subscription_the_period_is_the_calendar_month(conn):
    user = await member(conn, "free")
    assert await period(conn, user, at(2026, 12, 5, 9)) == (at(2026, 12, 1), at(2027, 1, 1))
    await subscribe(conn, user, at(2026, 11, 20), at(2026, 12, 20), status="canceled")
    assert await period(conn, user, at(2026, 12, 5, 9)) == (at(2026, 12, 1), at(2027, 1, 1))


async def test_a_subscriber_counts_from_the_subscriptions_anchor_and_steps_on_alone(conn):
    user = await member(conn, "premium")
    await subscribe(conn, user, at(2026, 11, 20, 14), at(2026, 12, 20, 14))
    inside = (at(2026, 11, 20, 14), at(2026, 12, 20, 14))
    assert await period(conn, user, at(2026, 12, 5)) == inside
    assert await period(conn, user, at(2026, 12, 20, 13, 59)) == inside
    # The renewal's webhook has not come yet: the next period starts anyway, a month on.
    assert await period(conn, user, at(2026, 12, 20, 14)) == (
        at(2026, 12, 20, 14),
        at(2027, 1, 20, 14),
    )
    assert await period(conn, user, at(2027, 3, 1)) == (at(2027, 2, 20, 14), at(2027, 3, 20, 14))
    # A row from before the stored period (a late settle) counts where it belongs.
    assert await period(conn, user, at(2026, 11, 1)) == (at(2026, 10, 20, 14), at(2026, 11, 20, 14))


async def test_a_month_end_anchor_and_a_yearly_plan(conn):
    monthly = await member(conn, "basic")
    await subscribe(conn, monthly, at(2027, 1, 31), at(2027, 2, 28))
    assert await period(conn, monthly, at(2027, 3, 15)) == (at(2027, 2, 28), at(2027, 3, 31))
    yearly = await member(conn, "basic")
    await subscribe(conn, yearly, at(2026, 6, 1), at(2027, 6, 1))
    assert await period(conn, yearly, at(2027, 7, 1)) == (at(2027, 6, 1), at(2028, 6, 1))


async def test_the_gate_and_the_ledger_count_in_the_subscribers_period(pool, conn):
    user = await member(conn, await plan(conn, token_limit=1_000))
    await subscribe(conn, user, at(2026, 11, 20), at(2026, 12, 20))
    gate = Gate(pool, period="billing")
    now = at(2026, 12, 5)
    grant = await gate.reserve(user.id, 10, 100, now, model="test/plain")
    assert grant.granted and grant.period_start == at(2026, 11, 20)
    assert grant.resets_at == at(2026, 12, 20)
    store = PostgresStore(pool, period="billing")
    rows = [
        {  # settled into the reservation's period
            "litellm_call_id": str(uuid.uuid4()),
            "created_at": now.isoformat(),
            "end_user": str(user.id),
            "model": "test/plain",
            "status": "success",
            "prompt_tokens": 10,
            "completion_tokens": 100,
            "reservation_id": str(grant.reservation_id),
        },
        {  # no reservation (the gate was open): the period of its time
            "litellm_call_id": str(uuid.uuid4()),
            "created_at": at(2026, 12, 21).isoformat(),
            "end_user": str(user.id),
            "model": "test/plain",
            "status": "success",
            "prompt_tokens": 5,
            "completion_tokens": 5,
        },
    ]
    assert await store.record_batch(rows) == [True, True]
    counters = await conn.fetch(
        "select period_start, used from usage_counters where end_user = $1 order by 1", user.id
    )
    assert [(r["period_start"], r["used"]) for r in counters] == [
        (at(2026, 11, 20), 110),
        (at(2026, 12, 20), 10),
    ]
    usage = usage_of(
        await conn.fetchrow("select * from vtai_usage($1, 'billing', $2)", user.id, now)
    )
    assert (usage.period_start, usage.resets_at, usage.used) == (
        at(2026, 11, 20),
        at(2026, 12, 20),
        110,
    )
    assert await conn.fetch("select * from vtai_verify_counters()") == []
