"""Plans (issue #17) on a real Postgres: every cap holds under concurrent turns from two
processes, rpm at the minute's boundary, exempt models, allowed models, weights, the clamp to
the tightest cap, settling, prices, and `vtai usage --verify` after weighted rows."""

from __future__ import annotations

import asyncio
import io
import json
import math
import sys
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import SimpleNamespace

import asyncpg
import pytest

from tests.conftest import ROOT, add_user
from vtai import cli
from vtai.metering.gate import Gate
from vtai.metering.postgres import PostgresStore

# Mid-month and mid-minute: no turn crosses a period, and `minute` is the window rpm counts in.
T0 = datetime(2026, 11, 15, 12, 0, 10, tzinfo=UTC)
MINUTE = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
SLACK = Decimal("0.00000001")  # what a dollar reservation holds beyond the row's cost


@pytest.fixture
async def pool(db_url):
    p = await asyncpg.create_pool(db_url, min_size=1, max_size=20)
    yield p
    await p.close()


async def plan(conn, **caps) -> str:
    """A new tier with these caps (token_limit, daily_limit, usd_limit, rpm, models)."""
    name = f"plan_{uuid.uuid4().hex[:8]}"
    caps.setdefault("token_limit", None)
    columns = ", ".join(caps)
    values = ", ".join(f"${i}" for i in range(2, len(caps) + 2))
    await conn.execute(
        f"insert into tiers (name, {columns}) values ($1, {values})", name, *caps.values()
    )
    return name


async def weigh(conn, pattern: str, weight) -> None:
    await conn.execute(
        "insert into model_weights (pattern, weight) values ($1, $2)"
        " on conflict (pattern) do update set weight = excluded.weight",
        pattern,
        Decimal(str(weight)),
    )


def ledger_row(user, grant, prompt, completion, model, cost="0", at=T0):
    return {
        "litellm_call_id": str(uuid.uuid4()),
        "created_at": at.isoformat(),
        "end_user": str(user.id),
        "session_id": "plans",
        "model": model,
        "status": "success",
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_cost": str(cost),
        "reservation_id": str(grant.reservation_id),
    }


async def period_counter(conn, user, at=T0):
    return await conn.fetchrow(
        "select used, reserved, used_raw, cost_used, cost_reserved, minute_start,"
        " minute_requests from usage_counters"
        " where end_user = $1 and period_start = vtai_period_start('month', $2)",
        user.id,
        at,
    )


async def day_counter(conn, user, at=T0):
    return await conn.fetchrow(
        "select used, reserved from daily_counters"
        " where end_user = $1 and day_start = vtai_period_start('day', $2)",
        user.id,
        at,
    )


async def assert_counters_equal_ledger(conn, user):
    """vtai_verify_counters() empty, nothing left reserved, raw tokens and dollars equal the
    ledger's (dollars of exempt rows not counted)."""
    assert await conn.fetch("select * from vtai_verify_counters()") == []
    ledger = await conn.fetchrow(
        "select coalesce(sum(total_tokens), 0) as raw,"
        " coalesce(sum(total_cost) filter (where weight > 0), 0) as cost"
        " from request_logs where end_user = $1",
        user.id,
    )
    c = await period_counter(conn, user)
    assert (c["reserved"], c["cost_reserved"]) == (0, 0)
    assert (c["used_raw"], c["cost_used"]) == (ledger["raw"], ledger["cost"])
    assert (
        await conn.fetchval(
            "select coalesce(sum(reserved), 0) from daily_counters where end_user = $1", user.id
        )
        == 0
    )
    assert await conn.fetchval("select count(*) from reservations") == 0


async def waiting_for_a_lock(conn, pid: int, task: asyncio.Task) -> None:
    """Return once the backend `pid` waits for a lock (nothing to await for that)."""
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        assert not task.done(), "the statement did not queue on the lock"
        query = "select wait_event_type = 'Lock' from pg_stat_activity where pid = $1"
        if await conn.fetchval(query, pid):
            return
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.005)


async def member(conn, tier: str) -> SimpleNamespace:
    """A user on `tier`, straight into profiles: the gate needs no password, and hashing one
    costs a test with many plans seconds."""
    user_id = await conn.fetchval(
        "insert into profiles (username, tier) values ($1, $2) returning id",
        f"m{uuid.uuid4().hex[:10]}",
        tier,
    )
    return SimpleNamespace(id=user_id)


def vtai_day(at: datetime) -> datetime:
    return at.replace(hour=0, minute=0, second=0, microsecond=0)


# --- Every cap holds under concurrent turns from two processes ------------------------------


async def two_processes(db_url, user, tasks: list[list[dict]], ttl_seconds=900) -> list[dict]:
    """Run each list of tasks in its own OS process (tests/metering/plans_worker.py), both
    processes starting their turns together; their tallies of grants and refusals."""
    procs = []
    for process_tasks in tasks:
        spec = {
            "db_url": db_url,
            "user_id": str(user.id),
            "ttl_seconds": ttl_seconds,
            "tasks": process_tasks,
        }
        procs.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.metering.plans_worker",
                json.dumps(spec),
                cwd=ROOT,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
        )
    try:
        for p in procs:
            assert (await asyncio.wait_for(p.stdout.readline(), 30)).strip() == b"ready"
        outs = await asyncio.wait_for(asyncio.gather(*(p.communicate(b"go\n") for p in procs)), 45)
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    assert [p.returncode for p in procs] == [0] * len(procs)
    results = [json.loads(out.decode().strip().splitlines()[-1]) for out, _ in outs]
    for r in results:
        assert r.get("granted", 0) > 0, results  # both processes took part
        assert not [k for k in r if "error" in k or k == "record_not_new"], results
    return results


def tasks(n, now=T0, **spec) -> list[dict]:
    return [dict({"now": now.isoformat(), "turns": None}, **spec) for _ in range(n)]


def refusals(results) -> dict:
    total: dict = {}
    for r in results:
        for k, v in r.items():
            if k != "granted":
                total[k] = total.get(k, 0) + v
    return total


async def test_token_cap_holds_across_two_processes_with_weights(db_url, conn):
    limit = 20_000
    user = await add_user(conn, tier=await plan(conn, token_limit=limit))
    await weigh(conn, "test/heavy*", 2.5)
    await weigh(conn, "test/light", 0.3)
    heavy = {"model": "test/heavy-1", "prompt": 7, "max_completion": 40}
    light = {"model": "test/light", "prompt": 30, "max_completion": 90}
    plain = {"model": "test/plain", "prompt": 3, "max_completion": 25}  # no rule: weight 1
    results = await two_processes(
        db_url,
        user,
        [tasks(4, **heavy) + tasks(3, **light) + tasks(2, **plain)] * 2,
    )
    assert set(refusals(results)) <= {"quota_exhausted", "prompt_exceeds_quota"}
    assert sum(refusals(results).values()) == 18  # every task ran until refused

    counted = await conn.fetchval(
        "select sum(counted_tokens)::bigint from request_logs where end_user = $1", user.id
    )
    overshoot = max(counted - limit, 0)
    assert overshoot == 0, (counted, limit)
    # Nothing lost either: what is left is too little for any task's prompt and one token.
    left = limit - counted
    assert left < min(
        math.ceil((t["prompt"] + 1) * w) for t, w in ((heavy, 2.5), (light, 0.3), (plain, 1))
    ), left
    # Every row counted ceil(raw x its weight).
    assert (
        await conn.fetchval(
            "select count(*) from request_logs where counted_tokens <> ceil(total_tokens * weight)"
            " or weight <> case when model like 'test/heavy%' then 2.5"
            " when model = 'test/light' then 0.3 else 1 end"
        )
        == 0
    )
    assert (await period_counter(conn, user))["used"] == counted
    await assert_counters_equal_ledger(conn, user)
    print(f"\ntokens: limit {limit}, counted {counted}, overshoot {overshoot}, left {left}")


async def test_daily_cap_holds_across_two_processes_on_two_days(db_url, conn):
    daily = 3_000
    user = await add_user(conn, tier=await plan(conn, token_limit=None, daily_limit=daily))
    await weigh(conn, "test/w*", 0.4)
    day1, day2 = T0, T0 + timedelta(days=1)  # the same month
    a = {"model": "test/w1", "prompt": 11, "max_completion": 60}
    b = {"model": "test/other", "prompt": 5, "max_completion": 30}
    per_process = tasks(3, day1, **a) + tasks(2, day1, **b) + tasks(3, day2, **b)
    per_process += tasks(2, day2, **a)
    # Turns of both days run at once here, so a day-2 turn must not expire a day-1 turn's
    # reservation (TTL 15 minutes) while it is still answering: a TTL of three days.
    results = await two_processes(db_url, user, [per_process] * 2, ttl_seconds=3 * 86400)
    assert set(refusals(results)) <= {"daily_exhausted", "prompt_exceeds_daily"}
    assert sum(refusals(results).values()) == 20

    per_day = dict(
        await conn.fetch(
            "select day_start, sum(counted_tokens)::bigint from request_logs"
            " where end_user = $1 group by day_start",
            user.id,
        )
    )
    assert set(per_day) == {datetime(2026, 11, 15, tzinfo=UTC), datetime(2026, 11, 16, tzinfo=UTC)}
    overshoot = {day: max(used - daily, 0) for day, used in per_day.items()}
    assert set(overshoot.values()) == {0}, per_day
    least = min(math.ceil((a["prompt"] + 1) * 0.4), b["prompt"] + 1)
    assert all(daily - used < least for used in per_day.values()), per_day
    for day in (day1, day2):
        assert (await day_counter(conn, user, day))["used"] == per_day[vtai_day(day)]
    await assert_counters_equal_ledger(conn, user)
    print(f"\ndaily: limit {daily}/day, counted {list(per_day.values())}, overshoot 0")


async def test_dollar_cap_holds_across_two_processes_exempt_rows_free(db_url, conn):
    usd = Decimal("0.1")
    user = await add_user(conn, tier=await plan(conn, usd_limit=usd))
    await weigh(conn, "test/a", 1.5)
    await weigh(conn, "test/free", 0)
    a = {"model": "test/a", "prompt": 7, "max_completion": 40, "prices": ["0.000002", "0.00001"]}
    b = {"model": "test/b", "prompt": 50, "max_completion": 80, "prices": ["0.000001", "0.000003"]}
    free = {
        "model": "test/free",
        "prompt": 20,
        "max_completion": 100,
        "prices": ["0.00001", "0.00005"],
        "turns": 15,
    }
    per_process = tasks(4, **a) + tasks(3, **b)
    per_process += [dict(t, turns=15) for t in tasks(2, **free)]
    results = await two_processes(db_url, user, [per_process, per_process])
    assert set(refusals(results)) <= {"usd_exhausted", "prompt_exceeds_usd"}
    assert sum(refusals(results).values()) == 14
    assert sum(r["granted"] for r in results) > 60

    spent, exempt, rows = await conn.fetchrow(
        "select sum(total_cost) filter (where weight > 0), sum(total_cost) filter"
        " (where weight = 0), count(*) filter (where weight > 0) from request_logs"
        " where end_user = $1",
        user.id,
    )
    assert exempt == 4 * 15 * (20 * Decimal("0.00001") + 100 * Decimal("0.00005"))
    overshoot = max(spent - usd, 0)
    assert overshoot == 0, (spent, usd)
    # Nothing lost: left is under the cheapest turn (plus what each settle gave back).
    cheapest = min(
        t["prompt"] * Decimal(t["prices"][0]) + Decimal(t["prices"][1]) + SLACK for t in (a, b)
    )
    assert usd - spent < cheapest + rows * SLACK, usd - spent
    assert (await period_counter(conn, user))["cost_used"] == spent
    await assert_counters_equal_ledger(conn, user)
    print(f"\ndollars: limit {usd}, spent {spent} (+{exempt} exempt), overshoot {overshoot}")


# --- Request rate ----------------------------------------------------------------------------


async def test_rpm_at_the_minute_boundary_exempt_models_too(pool, conn):
    user = await add_user(conn, tier=await plan(conn, token_limit=10_000, rpm=3))
    await weigh(conn, "test/free", 0)
    gate = Gate(pool)
    for s in (0, 20, 40):
        g = await gate.reserve(user.id, 5, 5, MINUTE + timedelta(seconds=s), model="test/a")
        assert g.granted and g.rpm == 3
    last = MINUTE + timedelta(seconds=59, microseconds=999_999)
    for model in ("test/a", "test/free"):
        refused = await gate.reserve(user.id, 5, 5, last, model=model)
        assert (refused.granted, refused.reason) == (False, "rate_limited")
        assert refused.resets_at == MINUTE + timedelta(minutes=1)
    assert await conn.fetchval("select count(*) from reservations") == 3

    # The next minute: granted again, and exempt turns count towards the rate.
    nxt = MINUTE + timedelta(minutes=1)
    assert (await gate.reserve(user.id, 5, 5, nxt, model="test/a")).granted
    assert (await gate.reserve(user.id, 5, 5, nxt, model="test/free")).granted
    assert (await gate.reserve(user.id, 5, 5, nxt, model="test/free")).granted
    refused = await gate.reserve(user.id, 5, 5, nxt + timedelta(seconds=1), model="test/free")
    assert refused.reason == "rate_limited" and refused.resets_at == nxt + timedelta(minutes=1)
    c = await period_counter(conn, user)
    assert (c["minute_start"], c["minute_requests"]) == (nxt, 3)

    # A turn reserved ahead would count a request nobody made: none on a tier with a rate.
    ahead = await gate.reserve(user.id, 5, 5, nxt + timedelta(minutes=5), ahead=True)
    assert (ahead.granted, ahead.reason) == (False, "not_ahead")
    other = await member(conn, await plan(conn, token_limit=10_000))
    assert (await gate.reserve(other.id, 5, 5, nxt, ahead=True)).granted


async def test_rpm_holds_under_concurrent_turns(pool, conn):
    rpm = 5
    user = await add_user(conn, tier=await plan(conn, token_limit=None, rpm=rpm))
    gate = Gate(pool)
    at = MINUTE + timedelta(seconds=30)
    grants = await asyncio.gather(
        *(gate.reserve(user.id, 5, 5, at, model=f"test/{i % 3}") for i in range(30))
    )
    assert sum(g.granted for g in grants) == rpm
    assert {g.reason for g in grants if not g.granted} == {"rate_limited"}


async def test_rpm_a_late_turn_counts_in_the_minute_already_open(pool, conn):
    """A turn whose clock says the previous minute (its transaction began before another
    one opened the next minute) must not reopen the old window and reset the count."""
    user = await add_user(conn, tier=await plan(conn, token_limit=None, rpm=2))
    gate = Gate(pool)
    nxt = MINUTE + timedelta(minutes=1)
    granted = 0
    for at in (nxt, nxt, nxt - timedelta(milliseconds=1), nxt + timedelta(seconds=5)):
        granted += (await gate.reserve(user.id, 5, 5, at)).granted
        granted += (await gate.reserve(user.id, 5, 5, at)).granted
    assert granted == 2


# --- Exempt models, allowed models, weights ---------------------------------------------------


async def test_exempt_model_answers_past_every_cap_and_counts_nothing(pool, conn):
    tier = await plan(conn, token_limit=2000, daily_limit=1500, usd_limit=Decimal("0.01"))
    user = await add_user(conn, tier=tier)
    await weigh(conn, "test/free*", 0)
    gate, store = Gate(pool), PostgresStore(pool)
    prices = (0.000001, 0.00001)
    while (g := await gate.reserve(user.id, 10, 300, T0, model="test/a", prices=prices)).granted:
        cost = Decimal("0.000001") * 10 + Decimal("0.00001") * g.max_tokens
        await store.record_batch([ledger_row(user, g, 10, g.max_tokens, "test/a", cost)])
    before, day_before = await period_counter(conn, user), await day_counter(conn, user)
    # Every cap exactly spent; each refuses a weighted model in turn.
    caps = {
        "token_limit": before["used"],
        "daily_limit": day_before["used"],
        "usd_limit": before["cost_used"],
    }
    for column, reason in [
        ("token_limit", "quota_exhausted"),
        ("daily_limit", "daily_exhausted"),
        ("usd_limit", "usd_exhausted"),
    ]:
        await conn.execute(f"update tiers set {column} = $2 where name = $1", tier, caps[column])
        refused = await gate.reserve(user.id, 1, 1, T0, model="test/a", prices=prices)
        assert refused.reason == reason
        await conn.execute(f"update tiers set {column} = null where name = $1", tier)
    await conn.execute(
        "update tiers set token_limit = $2, daily_limit = $3, usd_limit = $4 where name = $1",
        tier,
        *caps.values(),
    )

    # Exempt: granted what was asked, with no price known, and a prompt bigger than any cap.
    for model_prices in (None, (0.01, 0.02)):
        g = await gate.reserve(user.id, 5000, 700, T0, model="test/free-x", prices=model_prices)
        assert (g.granted, g.max_tokens, g.weight) == (True, 700, 0)
        row = ledger_row(user, g, 5000, 700, "test/free-x", cost="3.5")
        assert await store.record_batch([row]) == [True]
    after = await period_counter(conn, user)
    assert (after["used"], after["cost_used"]) == (before["used"], before["cost_used"])
    assert after["used_raw"] == before["used_raw"] + 2 * 5700
    assert await day_counter(conn, user) == day_before
    assert await conn.fetchval(
        "select array_agg(distinct counted_tokens) from request_logs where model = 'test/free-x'"
    ) == [0]
    refused = await gate.reserve(user.id, 1, 1, T0, model="test/a", prices=prices)
    assert refused.reason == "quota_exhausted"
    await assert_counters_equal_ledger(conn, user)


async def test_disallowed_model_is_refused_at_the_gate(pool, conn):
    models = ["openai/*", "local/smollm2-*", "local/a_b"]
    user = await add_user(conn, tier=await plan(conn, token_limit=10_000, rpm=100, models=models))
    await weigh(conn, "anthropic/*", 0)  # exempt from caps, not from the model list
    gate = Gate(pool)
    for model in ("openai/gpt-4o", "openai/org/deep/model", "local/smollm2-135m", "local/a_b"):
        assert (await gate.reserve(user.id, 5, 5, T0, model=model)).granted, model
    for model in ("anthropic/claude-3", "local/axb", "local/smollm3", "Openai/gpt-4o", "x"):
        g = await gate.reserve(user.id, 5, 5, T0, model=model)
        assert (g.granted, g.reason, g.reservation_id) == (False, "model_not_allowed", None)
    c = await period_counter(conn, user)
    assert (c["reserved"], c["minute_requests"]) == (40, 4)
    assert await conn.fetchval("select count(*) from reservations") == 4


async def test_weight_resolution_exact_then_longest_pattern(pool, conn):
    for pattern, weight in [
        ("*", 2),
        ("openai/*", 3),
        ("openai/gpt-4o*", 4),
        ("openai/gpt-4o", 5),  # exact: wins over the longer pattern above
        ("a_b", 7),  # exact, and _ is no wildcard
        ("x%y", 8),
        ("one?", 9),
    ]:
        await weigh(conn, pattern, weight)
    expected = {
        "openai/gpt-4o": 5,
        "openai/gpt-4o-mini": 4,
        "openai/o1": 3,
        "openai/org/o1": 3,  # * matches / too
        "anthropic/claude": 2,
        "a_b": 7,
        "axb": 2,
        "x%y": 8,
        "xzy": 2,
        "one1": 9,
        "one12": 2,
    }
    for model, weight in expected.items():
        assert await conn.fetchval("select vtai_model_weight($1)", model) == weight, model
    user = await add_user(conn, tier=await plan(conn, token_limit=None))
    gate = Gate(pool)
    for model, weight in expected.items():
        assert (await gate.reserve(user.id, 1, 1, T0, model=model)).weight == weight
    await conn.execute("delete from model_weights")
    assert await conn.fetchval("select vtai_model_weight('openai/gpt-4o')") == 1


async def test_weight_change_takes_effect_on_the_next_turn(pool, conn):
    user = await add_user(conn, tier=await plan(conn, token_limit=10_000))
    gate, store = Gate(pool), PostgresStore(pool)
    first = await gate.reserve(user.id, 10, 10, T0, model="test/m")
    assert first.weight == 1 and (await period_counter(conn, user))["reserved"] == 20
    await weigh(conn, "test/m", 3)
    second = await gate.reserve(user.id, 10, 10, T0, model="test/m")
    assert second.weight == 3 and (await period_counter(conn, user))["reserved"] == 80
    # Each settles at the weight it was granted at, whenever it settles.
    await store.record_batch(
        [
            ledger_row(user, first, 10, 10, "test/m"),
            ledger_row(user, second, 10, 10, "test/m"),
        ]
    )
    assert sorted(r[0] for r in await conn.fetch("select counted_tokens from request_logs")) == [
        20,
        60,
    ]
    assert (await period_counter(conn, user))["used"] == 80
    await assert_counters_equal_ledger(conn, user)


async def test_weights_of_many_decimals_never_round_past_a_cap(pool, conn):
    """left / weight is rounded to a scale Postgres picks: 3 / 3.0000000000000000000000001
    comes out as exactly 1, and one token at that weight counts 4 of the 3 left."""
    await weigh(conn, "test/odd", Decimal("3.0000000000000000000000001"))
    await weigh(conn, "test/tiny", Decimal("0.0000000000000000001"))
    gate = Gate(pool)
    for caps, reason in [
        ({"token_limit": 3}, "prompt_exceeds_quota"),
        ({"daily_limit": 3}, "prompt_exceeds_daily"),
    ]:
        user = await member(conn, await plan(conn, **caps))
        g = await gate.reserve(user.id, 0, 100, T0, model="test/odd")
        assert (g.granted, g.reason) == (False, reason)
        # A tiny weight: room for more tokens than a bigint holds, clamped to what was asked.
        g = await gate.reserve(user.id, 10, 100, T0, model="test/tiny")
        assert (g.granted, g.max_tokens) == (True, 100)
        assert (await period_counter(conn, user))["reserved"] == 1


@pytest.mark.parametrize("settle", ["record", "release"])
async def test_settling_locks_the_period_counter_before_the_day_counter(pool, conn, db_url, settle):
    """vtai_reserve() locks the period counter, then the day counter. A settle or release that
    took them the other way round deadlocks with it (Postgres runs data-modifying CTEs nobody
    reads last-first), and the deadlock fails the turn or its ledger write."""
    user = await add_user(conn, tier=await plan(conn, token_limit=1000, daily_limit=1000))
    grant = await Gate(pool).reserve(user.id, 10, 10, T0, model="test/a")
    reserver, settler = await asyncpg.connect(db_url), await asyncpg.connect(db_url)
    try:
        # The reserve's first lock...
        tx = reserver.transaction()
        await tx.start()
        await reserver.execute(
            "select 1 from usage_counters where end_user = $1 for update", user.id
        )
        if settle == "record":
            sql, args = (
                "select vtai_record_batch($1::text::jsonb)",
                (json.dumps([ledger_row(user, grant, 10, 10, "test/a")]),),
            )
        else:
            sql, args = "select vtai_release($1, $2)", (grant.reservation_id, user.id)
        settling = asyncio.create_task(settler.fetchval(sql, *args))
        # ... the settle queues on it ...
        await waiting_for_a_lock(conn, settler.get_server_pid(), settling)
        # ... and the reserve's second lock must not be held by the waiting settle.
        await reserver.execute("set local lock_timeout = '5s'")
        await reserver.execute(
            "select 1 from daily_counters where end_user = $1 for update", user.id
        )
        await tx.commit()
        result = await asyncio.wait_for(settling, 10)
        assert result in ([True], True)
    finally:
        await reserver.close()
        await settler.close()
    assert (await day_counter(conn, user))["reserved"] == 0
    await assert_counters_equal_ledger(conn, user)


# --- The clamp, the reasons, settling, prices ------------------------------------------------


async def test_max_tokens_is_clamped_to_the_tightest_cap(pool, conn):
    await weigh(conn, "test/double", 2)
    prices = (0.000001, 0.00001)
    gate = Gate(pool)
    cases = [
        # (caps, model, expected max_tokens for a prompt of 100 asking 1000)
        ({"token_limit": 300, "daily_limit": 1000, "usd_limit": Decimal(1)}, "test/a", 200),
        ({"token_limit": 300, "daily_limit": 1000, "usd_limit": Decimal(1)}, "test/double", 50),
        ({"token_limit": 1000, "daily_limit": 300, "usd_limit": Decimal(1)}, "test/a", 200),
        ({"token_limit": 1000, "daily_limit": 300, "usd_limit": Decimal(1)}, "test/double", 50),
        # (0.001 - 100 x 0.000001 - 0.00000001) / 0.00001 = 89.999
        ({"token_limit": 1000, "daily_limit": 1000, "usd_limit": Decimal("0.001")}, "test/a", 89),
    ]
    for caps, model, expected in cases:
        user = await member(conn, await plan(conn, **caps))
        g = await gate.reserve(user.id, 100, 1000, T0, model=model, prices=prices)
        assert (g.granted, g.max_tokens) == (True, expected), (caps, model)
        c = await period_counter(conn, user)
        assert c["reserved"] == math.ceil((100 + expected) * g.weight)
        assert c["cost_reserved"] == Decimal("0.0001") + expected * Decimal("0.00001") + SLACK
        assert c["cost_reserved"] <= caps["usd_limit"]
        assert c["reserved"] <= min(caps["token_limit"], caps["daily_limit"])


async def test_each_refusal_names_its_rule(pool, conn):
    prices = (0.000001, 0.00001)
    gate = Gate(pool)
    month_end, day_end = datetime(2026, 12, 1, tzinfo=UTC), datetime(2026, 11, 16, tzinfo=UTC)
    cases = [
        ({"token_limit": 0}, 10, None, "quota_exhausted", month_end),
        ({"token_limit": 100}, 100, None, "prompt_exceeds_quota", month_end),
        ({"daily_limit": 0}, 10, None, "daily_exhausted", day_end),
        ({"daily_limit": 100}, 100, None, "prompt_exceeds_daily", day_end),
        ({"usd_limit": Decimal(0)}, 10, prices, "usd_exhausted", month_end),
        # 100 x 0.000001 + 1 x 0.00001 + slack > 0.00011
        ({"usd_limit": Decimal("0.00011")}, 100, prices, "prompt_exceeds_usd", month_end),
        ({"usd_limit": Decimal(5)}, 10, None, "price_unknown", month_end),
        ({"models": ["other/*"]}, 10, None, "model_not_allowed", month_end),
        ({"rpm": 0}, 10, None, "rate_limited", MINUTE + timedelta(minutes=1)),
    ]
    for caps, prompt, model_prices, reason, resets in cases:
        user = await member(conn, await plan(conn, **caps))
        g = await gate.reserve(user.id, prompt, 50, T0, model="test/a", prices=model_prices)
        assert (g.granted, g.reason, g.resets_at) == (False, reason, resets), caps
    # Just fits: 100 x 0.000001 + 1 x 0.00001 + slack = 0.00011001
    user = await member(conn, await plan(conn, usd_limit=Decimal("0.00011001")))
    g = await gate.reserve(user.id, 100, 50, T0, model="test/a", prices=prices)
    assert (g.granted, g.max_tokens) == (True, 1)
    # A price is needed only under a dollar cap.
    user = await member(conn, await plan(conn, token_limit=1000))
    assert (await gate.reserve(user.id, 10, 50, T0, model="test/a", prices=None)).granted


async def test_settling_moves_counted_raw_tokens_and_cost(pool, conn):
    tier = await plan(conn, token_limit=10_000, daily_limit=5_000, usd_limit=Decimal(1))
    user = await add_user(conn, tier=tier)
    await weigh(conn, "test/m", 1.5)
    gate, store = Gate(pool), PostgresStore(pool)
    g = await gate.reserve(user.id, 100, 200, T0, model="test/m", prices=(0.000001, 0.000002))
    assert g.granted and g.max_tokens == 200 and g.weight == 1.5
    c = await period_counter(conn, user)
    assert (c["reserved"], c["cost_reserved"]) == (450, Decimal("0.00050001"))
    assert dict(await day_counter(conn, user)) == {"used": 0, "reserved": 450}

    await store.record_batch([ledger_row(user, g, 100, 51, "test/m", cost="0.000202")])
    c = await period_counter(conn, user)
    # ceil(151 x 1.5) = 227 counted; 151 raw
    assert (c["used"], c["used_raw"], c["cost_used"]) == (227, 151, Decimal("0.000202"))
    assert (c["reserved"], c["cost_reserved"]) == (0, 0)
    assert dict(await day_counter(conn, user)) == {"used": 227, "reserved": 0}
    logged = await conn.fetchrow("select weight, counted_tokens, day_start from request_logs")
    assert tuple(logged) == (Decimal("1.5"), 227, datetime(2026, 11, 15, tzinfo=UTC))
    usage = await gate.usage(user.id, T0)
    assert (usage.used, usage.daily_used, usage.usd_used) == (227, 227, 0.000202)
    await assert_counters_equal_ledger(conn, user)


# --- vtai usage --verify ---------------------------------------------------------------------


async def test_usage_verify_cli_after_weighted_rows(
    pool, conn, db_url, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("VTAI_DATABASE_URL", db_url)
    monkeypatch.setenv("VTAI_DATA_DIR", str(tmp_path))

    async def verify():
        monkeypatch.setattr(sys, "stdin", io.StringIO(""))
        code = await asyncio.to_thread(cli.main, ["usage", "--verify"])
        return code, capsys.readouterr().out

    user = await add_user(conn, tier=await plan(conn, token_limit=100_000, daily_limit=50_000))
    await weigh(conn, "test/heavy", 2.5)
    await weigh(conn, "test/free", 0)
    gate, store = Gate(pool), PostgresStore(pool)
    rows = []
    for i, model in enumerate(["test/heavy", "test/plain", "test/free"] * 3):
        g = await gate.reserve(user.id, 10 + i, 100, T0, model=model)
        rows.append(ledger_row(user, g, 10 + i, 33 + i, model))
    assert await store.record_batch(rows) == [True] * 9
    # counted = ceil(raw x weight): not the raw tokens the provider reported
    c = await period_counter(conn, user)
    assert c["used"] != c["used_raw"]
    assert c["used"] == await conn.fetchval("select sum(counted_tokens) from request_logs")

    code, out = await verify()
    assert (code, out.strip()) == (0, "ok: usage counters and aggregates equal the ledger")

    # It compares counted tokens, per period and per day.
    await conn.execute("update daily_counters set used = used + 1")
    code, out = await verify()
    assert code == 1 and out.count("mismatch") == 1 and " day " in out, out
    await conn.execute("update daily_counters set used = used - 1")
    await conn.execute("update usage_counters set used = used_raw")
    code, out = await verify()
    assert code == 1 and out.count("mismatch") == 1 and " period " in out, out


# --- Found by review: each would let a cap or a reservation be beaten -------------------------


async def test_the_catalogue_price_wins_in_the_database_not_the_callers(pool, conn):
    """A process with a stale (or no) price can't reserve dollars cheaper than the catalogue
    says: vtai_reserve reads `models` itself under a dollar cap."""
    user = await add_user(conn, tier=await plan(conn, usd_limit=Decimal("1")))
    await conn.execute(
        "insert into models (model, price_in, price_out) values ('acme/pricey', 0.001, 0.01)"
    )
    gate = Gate(pool)
    grant = await gate.reserve(user.id, 100, 1000, now=T0, model="acme/pricey", prices=None)
    assert grant.granted
    # 100 x 0.001 = 0.1 for the prompt, so 0.9 / 0.01 = 89 answer tokens (one unit of slack).
    assert grant.max_tokens == 89
    held = await conn.fetchval("select cost from reservations where id = $1", grant.reservation_id)
    assert held == Decimal("0.1") + 89 * Decimal("0.01") + SLACK


async def test_a_settled_cost_counts_no_more_than_its_reservation_held(pool, conn):
    user = await add_user(conn, tier=await plan(conn, usd_limit=Decimal("1")))
    gate, store = Gate(pool), PostgresStore(pool)
    grant = await gate.reserve(user.id, 10, 10, now=T0, model="gpt-4o-mini", prices=(0.01, 0.01))
    held = await conn.fetchval("select cost from reservations where id = $1", grant.reservation_id)
    # The row claims far more than the reservation held: the ledger keeps it, the cap counts
    # what was reserved.
    await store.record_batch([ledger_row(user, grant, 10, 10, "gpt-4o-mini", cost="5")])
    row = await period_counter(conn, user)
    assert row["cost_used"] == held < 1 and row["cost_reserved"] == 0


async def test_a_row_cannot_settle_another_users_reservation(pool, conn):
    owner, other = await add_user(conn), await add_user(conn)
    gate, store = Gate(pool), PostgresStore(pool)
    grant = await gate.reserve(owner.id, 10, 90, now=T0)
    await store.record_batch([ledger_row(other, grant, 10, 5, "gpt-4o-mini")])
    assert (
        await conn.fetchval("select count(*) from reservations where id = $1", grant.reservation_id)
        == 1
    )
    assert (await period_counter(conn, owner))["reserved"] == 100


async def test_a_null_model_pattern_is_refused_by_the_table(conn):
    name = await plan(conn, token_limit=10)
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute("update tiers set models = array['*', null] where name = $1", name)


async def test_a_short_answer_refusal_counts_no_request(pool, conn):
    user = await add_user(conn, tier=await plan(conn, token_limit=130, rpm=1))
    gate = Gate(pool)
    offered = await gate.reserve(user.id, 100, 500, now=T0, min_completion=256)
    assert not offered.granted and offered.reason == "short_answer_only"
    assert offered.max_tokens == 30
    # The user takes the short answer: still inside the minute's one request.
    taken = await gate.reserve(user.id, 100, 500, now=T0, min_completion=1)
    assert taken.granted and taken.max_tokens == 30
