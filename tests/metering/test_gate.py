"""The gate and the ledger against a real Postgres: limits, clamping, settle, TTL, periods."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest
from postgrest.exceptions import APIError

from tests.conftest import add_user, make_settings
from vtai.db.connection import Database
from vtai.metering.gate import Gate
from vtai.metering.ledger import Ledger
from vtai.metering.spool import Spool
from vtai.rest.store import SupabaseStore

T0 = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)


@pytest.fixture
async def pool(db_url):
    p = await asyncpg.create_pool(db_url, min_size=1, max_size=20)
    yield p
    await p.close()


@pytest.fixture
def ledger(pool, tmp_path):
    return Ledger(pool, Spool(tmp_path / "spool"))


def row(user, grant, prompt, completion, status="success", call_id=None, at=T0):
    return {
        "litellm_call_id": call_id or str(uuid.uuid4()),
        "created_at": at.isoformat(),
        "end_user": str(user.id),
        "session_id": "s1",
        "model": "test-model",
        "status": status,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "reservation_id": str(grant.reservation_id) if grant and grant.reservation_id else None,
    }


async def counter(conn, user, at=T0, period="month"):
    return await conn.fetchrow(
        "select used, reserved from usage_counters"
        " where end_user = $1 and period_start = vtai_period_start($2, $3)",
        user.id,
        period,
        at,
    )


async def test_limits_per_tier(pool, conn):
    gate = Gate(pool)
    expected = {"free": 10_000, "basic": 100_000, "premium": 500_000, "unlimited": None}
    for tier, limit in expected.items():
        user = await add_user(conn, tier=tier)
        grant = await gate.reserve(user.id, 100, 50, now=T0)
        assert grant.granted and grant.tier == tier and grant.token_limit == limit


async def test_reserve_clamps_answer_to_what_is_left(pool, conn, ledger):
    gate = Gate(pool)
    user = await add_user(conn)
    await conn.execute("update tiers set token_limit = 1000 where name = 'free'")
    first = await gate.reserve(user.id, 100, 500, now=T0)
    assert first.granted and first.max_tokens == 500
    assert await ledger.record(row(user, first, 100, 500)) is True
    second = await gate.reserve(user.id, 100, 500, now=T0)
    # 1000 - 600 used = 400 left; 100 of it is the prompt
    assert second.granted and second.max_tokens == 300
    await ledger.record(row(user, second, 100, 300))
    refused = await gate.reserve(user.id, 10, 500, now=T0)
    assert not refused.granted and refused.reason == "quota_exhausted"
    assert refused.used == 1000 and refused.token_limit == 1000
    assert refused.resets_at == datetime(2026, 12, 1, tzinfo=UTC)


async def test_prompt_larger_than_what_is_left_is_refused(pool, conn):
    gate = Gate(pool)
    user = await add_user(conn)
    grant = await gate.reserve(user.id, 10_000, 100, now=T0)
    assert not grant.granted and grant.reason == "prompt_exceeds_quota"
    assert (await counter(conn, user))["reserved"] == 0


async def test_settle_moves_reservation_to_used(pool, conn, ledger):
    gate = Gate(pool)
    user = await add_user(conn)
    grant = await gate.reserve(user.id, 50, 400, now=T0)
    assert dict(await counter(conn, user)) == {"used": 0, "reserved": 450}
    await ledger.record(row(user, grant, 50, 20))
    assert dict(await counter(conn, user)) == {"used": 70, "reserved": 0}
    assert await conn.fetchval("select count(*) from reservations") == 0


async def test_failure_releases_reservation_without_charge(pool, conn, ledger):
    gate = Gate(pool)
    user = await add_user(conn)
    grant = await gate.reserve(user.id, 50, 400, now=T0)
    await ledger.record(row(user, grant, 0, 0, status="failure"))
    assert dict(await counter(conn, user)) == {"used": 0, "reserved": 0}
    status = await conn.fetchval("select status from request_logs")
    assert status == "failure"


async def test_same_event_twice_is_one_row_and_one_charge(pool, conn, ledger):
    gate = Gate(pool)
    user = await add_user(conn)
    grant = await gate.reserve(user.id, 50, 400, now=T0)
    event = row(user, grant, 50, 30, call_id="call-dup")
    assert await ledger.record(event) is True
    assert await ledger.record(event) is False
    assert await conn.fetchval("select count(*) from request_logs") == 1
    assert dict(await counter(conn, user)) == {"used": 80, "reserved": 0}


async def test_expired_reservation_gives_quota_back(pool, conn):
    gate = Gate(pool, ttl_seconds=60)
    user = await add_user(conn)
    await conn.execute("update tiers set token_limit = 1000 where name = 'free'")
    crashed = await gate.reserve(user.id, 100, 900, now=T0)
    assert crashed.granted and crashed.max_tokens == 900
    early = await gate.reserve(user.id, 100, 900, now=T0 + timedelta(seconds=30))
    assert not early.granted
    later = await gate.reserve(user.id, 100, 900, now=T0 + timedelta(seconds=61))
    assert later.granted and later.max_tokens == 900
    assert (await counter(conn, user))["reserved"] == 1000


async def test_late_settle_after_expiry_still_charges_once(pool, conn, ledger):
    gate = Gate(pool, ttl_seconds=60)
    user = await add_user(conn)
    slow = await gate.reserve(user.id, 100, 100, now=T0)
    await gate.reserve(user.id, 1, 1, now=T0 + timedelta(minutes=5))  # expires `slow`
    await ledger.record(row(user, slow, 100, 50))
    c = await counter(conn, user)
    assert c["used"] == 150 and c["reserved"] == 2


async def test_period_rolls_over(pool, conn, ledger):
    gate = Gate(pool, period="day")
    user = await add_user(conn)
    await conn.execute("update tiers set token_limit = 100 where name = 'free'")
    grant = await gate.reserve(user.id, 50, 50, now=T0)
    await ledger.record(row(user, grant, 50, 50))
    assert not (await gate.reserve(user.id, 1, 1, now=T0 + timedelta(hours=11))).granted
    tomorrow = await gate.reserve(user.id, 1, 1, now=T0 + timedelta(hours=12))
    assert tomorrow.granted and tomorrow.used == 0
    assert tomorrow.period_start == datetime(2026, 11, 16, tzinfo=UTC)


@pytest.mark.parametrize(
    ("period", "start", "end"),
    [
        ("day", datetime(2026, 11, 15, tzinfo=UTC), datetime(2026, 11, 16, tzinfo=UTC)),
        ("week", datetime(2026, 11, 9, tzinfo=UTC), datetime(2026, 11, 16, tzinfo=UTC)),
        ("month", datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)),
        ("lifetime", datetime(1970, 1, 1, tzinfo=UTC), None),
    ],
)
async def test_periods_are_utc_calendar_periods(pool, conn, period, start, end):
    user = await add_user(conn)
    grant = await Gate(pool, period=period).reserve(user.id, 1, 1, now=T0)
    assert (grant.period_start, grant.resets_at) == (start, end)


async def test_unknown_user_is_refused(pool):
    grant = await Gate(pool).reserve(uuid.uuid4(), 1, 1)
    assert not grant.granted and grant.reason == "unknown_user"


async def test_demoted_user_gets_new_limit_on_next_turn(pool, conn, ledger):
    gate = Gate(pool)
    user = await add_user(conn, tier="basic")
    grant = await gate.reserve(user.id, 5000, 6000, now=T0)
    await ledger.record(row(user, grant, 5000, 6000))
    await conn.execute("update profiles set tier = 'free' where id = $1", user.id)
    refused = await gate.reserve(user.id, 10, 10, now=T0)
    assert not refused.granted and refused.tier == "free"


async def test_fifty_concurrent_turns_never_overshoot(pool, conn, ledger):
    """50 turns at once for one free user near the limit: the total stays within it."""
    gate = Gate(pool)
    user = await add_user(conn)
    seed = await gate.reserve(user.id, 4000, 5000, now=T0)
    await ledger.record(row(user, seed, 4000, 5000))  # 9,000 of 10,000 used

    async def turn(i):
        grant = await gate.reserve(user.id, 40, 100, now=T0)
        if not grant.granted:
            await ledger.record(row(user, grant, 0, 0, status="refused"))
            return 0
        await asyncio.sleep(0.001 * (i % 5))
        # a model that uses every token it was allowed
        await ledger.record(row(user, grant, 40, grant.max_tokens))
        return 40 + grant.max_tokens

    spent = await asyncio.gather(*(turn(i) for i in range(50)))
    total = await conn.fetchval(
        "select sum(total_tokens) from request_logs where end_user = $1", user.id
    )
    assert total == 9000 + sum(spent)
    assert total <= 10_000
    assert await conn.fetchval("select count(*) from request_logs") == 51
    assert await conn.fetch("select * from vtai_verify_counters()") == []
    assert (await counter(conn, user))["reserved"] == 0


async def test_verify_detects_a_tampered_counter(pool, conn, ledger):
    user = await add_user(conn)
    grant = await Gate(pool).reserve(user.id, 10, 10, now=T0)
    await ledger.record(row(user, grant, 10, 10))
    assert await conn.fetch("select * from vtai_verify_counters()") == []
    await conn.execute("update usage_counters set used = used - 5")
    bad = await conn.fetch("select * from vtai_verify_counters()")
    assert [(r["counter_used"], r["ledger_used"]) for r in bad] == [(15, 20)]


@pytest.mark.parametrize(("mode", "gate_commit"), [("durable", "on"), ("fast", "off")])
async def test_reserve_commit_mode_applies_to_the_gate_only(db_url, tmp_path, mode, gate_commit):
    db = await Database(make_settings(db_url, tmp_path, reserve_commit=mode)).open(migrate=False)
    try:
        assert await db.gate_pool.fetchval("show synchronous_commit") == gate_commit
        # Ledger rows are what the bill is made from: always durable.
        assert await db.pool.fetchval("show synchronous_commit") == "on"
    finally:
        await db.close()


async def test_a_connection_left_in_a_transaction_comes_back_clean(db_url, tmp_path):
    """The pools skip asyncpg's reset query; an open transaction must still be undone."""
    # One connection, so the second acquire gets the one the first left in a transaction.
    db = await Database(make_settings(db_url, tmp_path), pool_size=1).open(migrate=False)
    try:
        async with db.pool.acquire() as conn:
            await conn.execute("begin")
            await conn.execute("create temp table left_open (x int)")
        async with db.pool.acquire() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("select to_regclass('pg_temp.left_open')") is None
    finally:
        await db.close()


# --- Errors are not outages ------------------------------------------------------------------


class _Broken:
    """A pool whose query fails with `exc`: a stand-in for a bug or a schema that doesn't
    match (anything but an unreachable database)."""

    def __init__(self, exc: BaseException):
        self.exc = exc

    async def fetchrow(self, *args, **kwargs):
        raise self.exc


@pytest.mark.parametrize("fail_mode", ["open", "closed"])
@pytest.mark.parametrize(
    "exc",
    [
        TypeError("a bug"),
        asyncpg.UndefinedFunctionError("function public.vtai_reserve(...) does not exist"),
    ],
    ids=["bug", "schema"],
)
async def test_an_error_refuses_the_turn_whatever_the_fail_mode(fail_mode, exc, caplog):
    grant = await Gate(_Broken(exc), fail_mode=fail_mode).reserve(uuid.uuid4(), 10, 10)
    assert not grant.granted and grant.reason == "error"
    (logged,) = [r for r in caplog.records if r.name == "vtai.metering.gate"]
    assert logged.levelname == "ERROR" and logged.exc_info[1] is exc  # with its traceback


@pytest.mark.parametrize(("fail_mode", "granted"), [("open", True), ("closed", False)])
async def test_an_unreachable_database_follows_the_fail_mode(fail_mode, granted):
    dead = await asyncpg.create_pool(
        "postgresql://nobody@127.0.0.1:9/none", min_size=0, max_size=1, timeout=1
    )
    try:
        grant = await Gate(dead, fail_mode=fail_mode, timeout=1).reserve(uuid.uuid4(), 10, 10)
    finally:
        await dead.close()
    assert grant.granted is granted
    assert grant.reason == ("open" if granted else "unavailable")


async def test_a_turn_whose_gate_errs_is_refused_with_a_row_and_nothing_is_sent(
    db_url, conn, tmp_path
):
    from tests.metering.test_turn import collect, request
    from vtai.metering.rows import OpenCalls
    from vtai.metering.turn import TurnRunner

    user = await add_user(conn)
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    try:
        settings = make_settings(db_url, tmp_path, model="gpt-4o-mini", gate_fail_mode="open")
        gate = Gate(_Broken(KeyError("granted")), fail_mode="open")
        runner = TurnRunner(
            gate,
            Ledger(pool, Spool(tmp_path / "spool")),
            OpenCalls(),
            settings,
            {"mock_response": "must not be answered"},
        )
        outcome, streamed = await collect(runner, request(user))
        await runner.drain()
    finally:
        await pool.close()
    assert outcome.kind == "refused" and not streamed
    assert "error on the server" in outcome.notice
    row = await conn.fetchrow("select status, additional_details from request_logs")
    assert row["status"] == "refused" and '"reason": "error"' in row["additional_details"]


class _Rpc:
    def __init__(self, answer):
        self.answer = answer

    def rpc(self, fn, params):
        return self

    async def execute(self):
        if isinstance(self.answer, BaseException):
            raise self.answer
        return type("Response", (), {"data": self.answer})()


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (httpx.ConnectError("connection refused"), "open"),
        (APIError({"code": "503", "message": "Service Unavailable"}), "open"),
        (APIError({"code": "42883", "message": "function does not exist"}), "error"),
        ([], "error"),  # an answer without a row
        ([{"granted": True, "reason": "granted", "reservation_id": "not-a-uuid"}], "error"),
    ],
    ids=["transport", "gateway", "schema", "empty", "malformed"],
)
async def test_rest_reserve_follows_the_fail_mode_only_when_unreachable(answer, reason):
    store = SupabaseStore(_Rpc(answer), fail_mode="open")
    grant = await store.reserve(uuid.uuid4(), 10, 10)
    assert grant.reason == reason and grant.granted is (reason == "open")
