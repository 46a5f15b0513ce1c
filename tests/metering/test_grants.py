"""Top-up grants (issue #19 item 4) on a real Postgres: counted on top of the tier's period
token limit by vtai_reserve, atomically; the tier's own tokens first, then grants, earliest
expiry first; never past a daily cap; spent by two processes at once with no overshoot."""

from __future__ import annotations

import uuid
from datetime import timedelta

import asyncpg
import pytest

from tests.metering.test_plans import (
    T0,
    assert_counters_equal_ledger,
    ledger_row,
    member,
    period_counter,
    plan,
    refusals,
    tasks,
    two_processes,
)
from vtai.metering.gate import Gate, usage_of
from vtai.metering.postgres import PostgresStore

# Grants in these tests outlive both T0 and the wall clock: a settle checks expiry at now().
LATER = T0 + timedelta(days=3650)


@pytest.fixture
async def pool(db_url):
    p = await asyncpg.create_pool(db_url, min_size=1, max_size=20)
    yield p
    await p.close()


async def give(conn, user, tokens, expires=LATER, used=0) -> uuid.UUID:
    return await conn.fetchval(
        "insert into token_grants (end_user, tokens, used, expires_at, source)"
        " values ($1, $2, $3, $4, 'admin') returning id",
        user.id,
        tokens,
        used,
        expires,
    )


async def grants_used(conn, *ids) -> list[int]:
    rows = await conn.fetch("select id, used from token_grants where id = any($1)", list(ids))
    used = {r["id"]: r["used"] for r in rows}
    return [used[i] for i in ids]


async def settle(pool, user, grant, prompt, completion, model="test/plain"):
    store = PostgresStore(pool)
    row = ledger_row(user, grant, prompt, completion, model)
    assert await store.record_batch([row]) == [True]


async def test_tier_tokens_go_first_then_grants_earliest_expiry_first(pool, conn):
    user = await member(conn, await plan(conn, token_limit=1_000))
    late = await give(conn, user, 500, expires=LATER)
    early = await give(conn, user, 300, expires=LATER - timedelta(days=1))
    gate = Gate(pool)

    # All of it: the tier's 1,000 and both grants' 800, less the prompt.
    grant = await gate.reserve(user.id, 100, 5_000, T0, model="test/plain")
    assert grant.granted and grant.max_tokens == 1_700
    await gate.release(grant.reservation_id, user.id)

    grant = await gate.reserve(user.id, 100, 800, T0, model="test/plain")
    await settle(pool, user, grant, 100, 800)  # 900: inside the tier's own tokens
    assert await grants_used(conn, early, late) == [0, 0]

    grant = await gate.reserve(user.id, 100, 300, T0, model="test/plain")
    await settle(pool, user, grant, 100, 300)  # 1,300: 300 past the tier, the early grant's
    assert await grants_used(conn, early, late) == [300, 0]

    grant = await gate.reserve(user.id, 50, 5_000, T0, model="test/plain")
    assert grant.granted and grant.max_tokens == 450  # the late grant's 500, less the prompt
    await settle(pool, user, grant, 50, 450)
    assert await grants_used(conn, early, late) == [300, 500]

    refused = await gate.reserve(user.id, 1, 10, T0, model="test/plain")
    assert (refused.granted, refused.reason) == (False, "quota_exhausted")
    await assert_counters_equal_ledger(conn, user)


async def test_weighted_turns_spend_grants_in_counted_tokens(pool, conn):
    user = await member(conn, await plan(conn, token_limit=100))
    await conn.execute("insert into model_weights (pattern, weight) values ('test/heavy', 2)")
    top = await give(conn, user, 1_000)
    gate = Gate(pool)
    grant = await gate.reserve(user.id, 10, 10_000, T0, model="test/heavy")
    assert grant.max_tokens == 540  # (100 + 1,000) / 2, less the prompt
    await settle(pool, user, grant, 10, 540, model="test/heavy")
    assert await grants_used(conn, top) == [1_000]
    assert (await period_counter(conn, user))["used"] == 1_100


async def test_expired_and_spent_grants_count_nothing(pool, conn):
    user = await member(conn, await plan(conn, token_limit=100))
    await give(conn, user, 5_000, expires=T0 - timedelta(seconds=1))
    await give(conn, user, 700, used=700)
    grant = await Gate(pool).reserve(user.id, 10, 5_000, T0, model="test/plain")
    assert grant.max_tokens == 90


async def test_a_grant_never_lifts_the_daily_cap(pool, conn):
    user = await member(conn, await plan(conn, token_limit=100, daily_limit=150))
    await give(conn, user, 10_000)
    grant = await Gate(pool).reserve(user.id, 10, 5_000, T0, model="test/plain")
    assert grant.max_tokens == 140


async def test_usage_shows_the_top_up_and_its_earliest_expiry(pool, conn):
    user = await member(conn, await plan(conn, token_limit=1_000))
    await give(conn, user, 50_000, expires=LATER)
    await give(conn, user, 2_000, expires=LATER - timedelta(days=5), used=500)
    await give(conn, user, 9_000, expires=T0 - timedelta(days=1))  # expired
    row = await conn.fetchrow("select * from vtai_usage($1, 'month', $2)", user.id, T0)
    usage = usage_of(row)
    assert usage.topup_left == 51_500
    assert usage.topup_until == LATER - timedelta(days=5)
    assert usage.remaining == 1_000 + 51_500


async def test_a_top_up_spent_by_two_processes_never_overshoots(db_url, conn):
    limit, bought = 2_000, 3_000
    user = await member(conn, await plan(conn, token_limit=limit))
    a = await give(conn, user, 1_000, expires=LATER - timedelta(days=1))
    b = await give(conn, user, bought - 1_000)
    turn = {"model": "test/plain", "prompt": 13, "max_completion": 57}
    results = await two_processes(db_url, user, [tasks(5, **turn)] * 2)
    assert set(refusals(results)) <= {"quota_exhausted", "prompt_exceeds_quota"}

    counted = await conn.fetchval(
        "select sum(counted_tokens)::bigint from request_logs where end_user = $1", user.id
    )
    assert counted <= limit + bought, (counted, limit + bought)  # no overshoot
    assert limit + bought - counted <= 13  # nothing lost: too little left for a prompt + 1
    used = await grants_used(conn, a, b)
    assert sum(used) == counted - limit  # every token past the tier's came from a grant
    assert used[0] == 1_000  # the earlier expiry was spent first
    await assert_counters_equal_ledger(conn, user)
