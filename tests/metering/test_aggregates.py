"""Usage aggregates stay equal to the ledger: concurrent writes, backfill, spool replay."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from tests.conftest import add_user
from vtai.metering.gate import Gate
from vtai.metering.ledger import Ledger
from vtai.metering.spool import Spool

T0 = datetime(2026, 11, 3, 22, 30, tzinfo=UTC)


@pytest.fixture
async def pool(db_url):
    p = await asyncpg.create_pool(db_url, min_size=1, max_size=20)
    yield p
    await p.close()


def row(user, i, status="success", model="m1", at=T0):
    return {
        "litellm_call_id": f"agg-{uuid.uuid4()}",
        "created_at": (at + timedelta(minutes=37 * i)).isoformat(),
        "end_user": str(user.id),
        "model": model,
        "status": status,
        "prompt_tokens": 0 if status == "refused" else 10 + i % 7,
        "completion_tokens": 0 if status == "refused" else 5 + i % 3,
        "total_cost": 0.001 * (i % 4),
    }


async def test_concurrent_writes_keep_aggregates_equal_to_ledger(pool, conn, tmp_path):
    users = [await add_user(conn) for _ in range(3)]
    ledger = Ledger(pool, Spool(tmp_path))
    statuses = ["success", "success", "failure", "refused"]
    rows = [row(users[i % 3], i, statuses[i % 4], f"m{i % 2}") for i in range(120)]
    await asyncio.gather(*(ledger.record(r) for r in rows))
    assert await conn.fetch("select * from vtai_verify_aggregates()") == []
    day = await conn.fetchrow(
        "select sum(requests) r, sum(failures) f, sum(refusals) x, sum(total_tokens) t"
        " from usage_aggregates where granularity = 'day'"
    )
    assert (day["r"], day["f"], day["x"]) == (120, 30, 30)
    assert day["t"] == await conn.fetchval("select sum(total_tokens) from request_logs")


async def test_backfill_rebuilds_any_range(pool, conn, tmp_path):
    user = await add_user(conn)
    ledger = Ledger(pool, Spool(tmp_path))
    for i in range(40):
        await ledger.record(row(user, i))
    await conn.execute("delete from usage_aggregates")
    assert await conn.fetch("select * from vtai_verify_aggregates()") != []
    await conn.fetchval("select vtai_backfill_aggregates($1, $2)", T0, T0 + timedelta(days=2))
    assert await conn.fetch("select * from vtai_verify_aggregates()") == []
    # a second backfill of an overlapping range changes nothing
    await conn.fetchval(
        "select vtai_backfill_aggregates($1, $2)", T0 + timedelta(hours=3), T0 + timedelta(hours=5)
    )
    assert await conn.fetch("select * from vtai_verify_aggregates()") == []


async def test_spool_replay_updates_aggregates_once(pool, conn, tmp_path):
    user = await add_user(conn)
    spool = Spool(tmp_path / "spool")
    grant = await Gate(pool).reserve(user.id, 10, 10)
    r = {**row(user, 1), "reservation_id": str(grant.reservation_id)}
    spool.append(r)
    spool.append(r)  # the same row spooled twice (a retried callback)
    result = await Ledger(pool, spool).replayer.replay()
    assert (result.recorded, result.duplicates) == (1, 1)
    assert (
        await conn.fetchval("select sum(requests) from usage_aggregates where granularity = 'hour'")
        == 1
    )
    assert await conn.fetch("select * from vtai_verify_aggregates()") == []


async def test_daily_usage_for_the_meter_reads_day_buckets(pool, conn, tmp_path):
    from vtai.ui.quota import daily_chart

    user = await add_user(conn)
    ledger = Ledger(pool, Spool(tmp_path))
    for i in range(6):  # 37-minute steps from 22:30 cross midnight
        await ledger.record(row(user, i))
    days = await Gate(pool).daily(user.id, T0 - timedelta(days=1))
    assert [d.day for d, _ in days] == [3, 4]
    total = await conn.fetchval("select sum(total_tokens) from request_logs")
    assert sum(t for _, t in days) == total
    chart = daily_chart(days)
    assert chart.count("\n") == 1 and "Nov 03" in chart and "█" in chart
