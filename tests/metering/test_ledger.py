"""Batched ledger writes: vtai_record_batch() keeps vtai_record()'s rules, and the Ledger's
queue batches concurrent rows without weakening the spool guarantee."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import UTC, datetime

import asyncpg
import pytest

from tests.conftest import add_user
from vtai.metering.gate import Gate
from vtai.metering.ledger import Ledger
from vtai.metering.postgres import PostgresStore
from vtai.metering.spool import Spool

pytestmark = pytest.mark.db

NOV = datetime(2026, 11, 1, tzinfo=UTC)
DEC = datetime(2026, 12, 1, tzinfo=UTC)


@pytest.fixture
async def pool(db_url):
    p = await asyncpg.create_pool(db_url, min_size=1, max_size=20)
    yield p
    await p.close()


def turn(user, tokens=30, **extra) -> dict:
    return {
        "litellm_call_id": f"batch-{uuid.uuid4()}",
        "end_user": str(user.id),
        "model": "m",
        "status": "success",
        "prompt_tokens": tokens // 3,
        "completion_tokens": tokens - tokens // 3,
        **extra,
    }


class CountingStore(PostgresStore):
    """The real Postgres store, counting how many rows each call carried."""

    def __init__(self, pool):
        super().__init__(pool)
        self.calls: list[int] = []

    async def record_encoded(self, texts):
        self.calls.append(len(texts))
        return await super().record_encoded(texts)


async def consistent(conn) -> bool:
    return (
        await conn.fetch("select * from vtai_verify_counters()") == []
        and await conn.fetch("select * from vtai_verify_aggregates()") == []
    )


async def test_batch_answers_per_row_and_counts_a_repeated_call_once(pool, conn):
    user = await add_user(conn)
    store = PostgresStore(pool)
    a, b = turn(user, 30), turn(user, 60)
    assert await store.record_batch([a, b, dict(a)]) == [True, True, False]
    assert await store.record_batch([b, turn(user, 9)]) == [False, True]
    assert await store.record_batch([]) == []
    assert await conn.fetchval("select used from usage_counters where end_user = $1", user.id) == 99
    assert await consistent(conn)


async def test_batch_settles_each_reservation_in_its_own_period(pool, conn):
    user = await add_user(conn)
    gate = Gate(pool)
    late = await gate.reserve(user.id, 10, 90, now=datetime(2026, 11, 30, 23, 59, tzinfo=UTC))
    early = await gate.reserve(user.id, 10, 90, now=datetime(2026, 12, 1, 0, 5, tzinfo=UTC))
    # The November turn finishes in December: charged to November, where it was reserved.
    rows = [
        turn(user, 40, reservation_id=str(late.reservation_id), created_at=DEC.isoformat()),
        turn(user, 25, reservation_id=str(early.reservation_id), created_at=DEC.isoformat()),
    ]
    assert await PostgresStore(pool).record_batch(rows) == [True, True]
    counters = {
        r["period_start"]: (r["used"], r["reserved"])
        for r in await conn.fetch(
            "select period_start, used, reserved from usage_counters where end_user = $1", user.id
        )
    }
    assert counters == {NOV: (40, 0), DEC: (25, 0)}
    assert await conn.fetchval("select count(*) from reservations") == 0
    assert await consistent(conn)


async def test_a_non_array_is_refused_as_bad_data(pool):
    with pytest.raises(asyncpg.InvalidParameterValueError):
        await pool.fetchval("select vtai_record_batch('{}'::jsonb)")


async def test_concurrent_rows_share_transactions(pool, conn, tmp_path):
    users = [await add_user(conn) for _ in range(5)]
    store = CountingStore(pool)
    ledger = Ledger(store, Spool(tmp_path))
    rows = [turn(users[i % 5], 10 + i % 7) for i in range(400)]
    results = await asyncio.gather(*(ledger.record(r) for r in rows))
    assert results == [True] * 400
    assert sum(store.calls) == 400
    assert len(store.calls) < 100, store.calls
    assert max(store.calls) <= ledger.batch_size
    assert await conn.fetchval("select count(*) from request_logs") == 400
    assert ledger.spool.in_flight == 0
    assert await consistent(conn)


async def test_a_bad_row_does_not_spool_its_batch_mates(pool, conn, tmp_path):
    user = await add_user(conn)
    spool = Spool(tmp_path)
    ledger = Ledger(pool, spool)
    good = [turn(user) for _ in range(20)]
    bad = turn(user, end_user="not-a-uuid")
    results = await asyncio.gather(*(ledger.record(r) for r in [*good[:10], bad, *good[10:]]))
    assert results == [True] * 10 + [None] + [True] * 10
    assert spool.status().waiting == 1
    assert (await ledger.replayer.replay()).quarantined == 1
    assert await conn.fetchval("select count(*) from request_logs") == 20
    assert await consistent(conn)


async def test_database_down_spools_the_whole_batch_once(conn, tmp_path, pool):
    user = await add_user(conn)
    spool = Spool(tmp_path)
    dead = await asyncpg.create_pool(
        "postgresql://nobody@127.0.0.1:9/none", min_size=0, max_size=2, timeout=1
    )
    down = Ledger(dead, spool, timeout=1)
    rows = [turn(user) for _ in range(30)]
    assert await asyncio.gather(*(down.record(r) for r in rows)) == [None] * 30
    assert spool.status().waiting == 30
    assert spool.in_flight == 0
    result = await Ledger(pool, spool).replayer.replay()
    assert (result.recorded, result.duplicates) == (30, 0)
    assert await consistent(conn)
    await dead.close()


async def test_concurrent_batches_over_shared_users_never_deadlock(pool, conn):
    """Batches naming the same users in different orders queue on the counters in key
    order; settles race reserves for the same users."""
    users = [await add_user(conn, tier="unlimited") for _ in range(8)]
    gate, store = Gate(pool), PostgresStore(pool)
    grants = [await gate.reserve(users[i % 8].id, 5, 20) for i in range(320)]
    rows = [
        turn(users[i % 8], 25, reservation_id=str(g.reservation_id)) for i, g in enumerate(grants)
    ]
    random.Random(7).shuffle(rows)
    batches = [rows[i : i + 40] for i in range(0, len(rows), 40)]
    reserves = [gate.reserve(u.id, 5, 20) for u in users for _ in range(5)]
    out = await asyncio.gather(*(store.record_batch(b) for b in batches), *reserves)
    assert all(all(r) for r in out[: len(batches)])
    assert all(g.granted for g in out[len(batches) :])
    assert await conn.fetchval("select count(*) from reservations") == 40
    assert await conn.fetchval("select sum(reserved) from usage_counters") == 40 * 25
    assert await consistent(conn)
    deadlocks = await conn.fetchval(
        "select deadlocks from pg_stat_database where datname = current_database()"
    )
    assert deadlocks == 0


async def test_a_cancelled_caller_does_not_cancel_its_rows_write(pool, conn, tmp_path):
    user = await add_user(conn)
    ledger = Ledger(pool, Spool(tmp_path))
    row = turn(user)
    task = asyncio.create_task(ledger.record(row))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await ledger.stop()
    written = await conn.fetchval(
        "select count(*) from request_logs where litellm_call_id = $1", row["litellm_call_id"]
    )
    assert written == 1
    assert ledger.spool.in_flight == 0
