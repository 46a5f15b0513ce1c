"""Ledger ingest: how many logged turns per second one Postgres takes, counters kept exact.

Every row settles a reservation, as a real turn's does. Three ways in:
- single: `vtai_record`, one transaction per turn, from several connections;
- batch: `vtai_record_batch` with a fixed number of rows per call (the database's ceiling);
- app: `Ledger.record()` called by many concurrent turns, exactly as the app writes: each row
  held in the in-flight journal first, batched by the ledger's queue, released once committed.

    python benchmarks/ingest.py [--db-url URL] [--rows 20000] [--batch-rows 100000]
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg  # noqa: E402

from benchmarks import common  # noqa: E402
from vtai.metering.ledger import Ledger  # noqa: E402
from vtai.metering.spool import Spool  # noqa: E402


async def prepare(conn: asyncpg.Connection, users: list[uuid.UUID], n: int) -> list[str]:
    """n turn rows as the app sends them, each holding a reservation like a granted turn."""
    now = datetime.now(UTC)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    owners = [users[i % len(users)] for i in range(n)]
    ids = await conn.fetch(
        "insert into reservations (end_user, period_start, amount, expires_at)"
        " select u, $2, 700, now() + interval '1 hour' from unnest($1::uuid[]) u returning id,"
        " end_user",
        owners,
        start,
    )
    await conn.execute(
        "insert into usage_counters (end_user, period_start, reserved)"
        " select end_user, period_start, sum(amount) from reservations group by 1, 2"
        " on conflict (end_user, period_start) do update set reserved = excluded.reserved"
    )
    rows = []
    for r in ids:
        rows.append(
            json.dumps(
                {
                    "litellm_call_id": str(uuid.uuid4()),
                    "created_at": now.isoformat(),
                    "end_user": str(r["end_user"]),
                    "session_id": f"chat-{r['end_user']}",
                    "model": "gpt-4o-mini",
                    "provider": "openai",
                    "status": "success",
                    "reservation_id": str(r["id"]),
                    "period_start": start.isoformat(),
                    "prompt_tokens": 120,
                    "completion_tokens": 180,
                    "total_tokens": 300,
                    "total_cost": 0.000126,
                    "response_time": 0.8,
                    "messages": [{"role": "user", "content": "What is the capital of France?"}],
                    "response": "Paris is the capital of France.",
                    "additional_details": {"tier": "bench", "max_tokens": 512, "stream": True},
                }
            )
        )
    return rows


async def ingest(pool: asyncpg.Pool, rows: list[str], batch: int, writers: int) -> float:
    """Seconds to write all rows with `writers` concurrent connections."""
    chunks = [rows[i : i + batch] for i in range(0, len(rows), batch)]
    queue = iter(chunks)

    async def writer() -> int:
        done = 0
        async with pool.acquire() as conn:
            for chunk in queue:
                if batch == 1:
                    done += await conn.fetchval("select public.vtai_record($1::jsonb)", chunk[0])
                else:
                    got = await conn.fetchval(
                        "select public.vtai_record_batch($1::jsonb)", "[" + ",".join(chunk) + "]"
                    )
                    done += sum(got)
        return done

    t0 = time.perf_counter()
    written = sum(await asyncio.gather(*(writer() for _ in range(writers))))
    elapsed = time.perf_counter() - t0
    assert written == len(rows), (written, len(rows))
    return elapsed


async def ingest_app(
    pool: asyncpg.Pool, rows: list[str], in_flight: int, data_dir: Path
) -> tuple[float, Ledger]:
    """Seconds for `in_flight` concurrent turns to record all rows through the app's Ledger."""
    records = [json.loads(r) for r in rows]
    ledger = Ledger(pool, Spool(data_dir / "spool"))
    queue = iter(records)

    async def turn() -> int:
        return sum([await ledger.record(r) is True for r in queue])

    t0 = time.perf_counter()
    written = sum(await asyncio.gather(*(turn() for _ in range(in_flight))))
    elapsed = time.perf_counter() - t0
    assert written == len(rows), (written, len(rows))
    assert not list((data_dir / "spool" / "inflight").glob("*.json")), "holds left behind"
    return elapsed, ledger


async def bench(
    db_url: str, rows: int, batch_rows: int, batch: int, writers: int, users: int, in_flight: int
) -> common.Section:
    conn = await asyncpg.connect(db_url)
    # Plain text, not the app's JSON codec: payloads are already serialised.
    pool = await asyncpg.create_pool(db_url, min_size=writers, max_size=writers)
    try:
        people = await common.add_users(conn, users)
        results, data = [], {}
        modes = (("single", rows, 1), ("batch", batch_rows, batch), ("app", batch_rows, 0))
        for mode, n, size in modes:
            payload = await prepare(conn, people, n)
            # Each mode starts where autovacuum and a checkpoint would leave a live database,
            # not amid the dead rows and dirty pages of the previous mode.
            await conn.execute("vacuum analyze")
            await conn.execute("checkpoint")
            before = await conn.fetchval("select count(*) from request_logs")
            if mode == "app":
                with common.data_dir() as tmp:
                    elapsed, ledger = await ingest_app(pool, payload, in_flight, tmp)
                    size = f"queue, up to {ledger.batch_size}"
                    how = f"{in_flight:,} turns in flight, {ledger.writers} ledger writers"
            else:
                elapsed = await ingest(pool, payload, size, writers)
                how = f"{writers} connections"
            after = await conn.fetchval("select count(*) from request_logs")
            # A replay of the same rows must change nothing.
            await ingest_replay(pool, payload[: min(len(payload), 200)])
            data[mode] = {
                "rows": n,
                "seconds": elapsed,
                "per_second": n / elapsed,
                "written": after - before,
            }
            results.append(
                [
                    mode,
                    f"{size:,}" if isinstance(size, int) else size,
                    how,
                    f"{n:,}",
                    f"{elapsed:.2f}",
                    f"{n / elapsed:,.0f}",
                ]
            )
        data["rows_total"] = await conn.fetchval("select count(*) from request_logs")
        data["reserved"] = await conn.fetchval(
            "select coalesce(sum(reserved), 0) from usage_counters"
        )
        data["reservations"] = await conn.fetchval("select count(*) from reservations")
        data["counters_exact"] = await common.counters_exact(conn)
        data["aggregates_exact"] = await conn.fetch("select * from vtai_verify_aggregates()") == []
    finally:
        await pool.close()
        await conn.close()
    return section(rows, batch_rows, batch, writers, users, in_flight, results, data)


async def ingest_replay(pool: asyncpg.Pool, rows: list[str]) -> None:
    async with pool.acquire() as conn:
        for r in rows[:20]:
            assert await conn.fetchval("select public.vtai_record($1::jsonb)", r) is False
        got = await conn.fetchval(
            "select public.vtai_record_batch($1::jsonb)", "[" + ",".join(rows) + "]"
        )
        assert not any(got), got


def section(rows, batch_rows, batch, writers, users, in_flight, results, data) -> common.Section:
    rates = {mode: data[mode]["per_second"] for mode in ("single", "batch", "app")}
    targets = [
        common.Target(
            "the app's ledger (`Ledger.record`, batched)",
            ">= 10,000 turns/s",
            f"{rates['app']:,.0f}/s",
            rates["app"] >= 10_000,
            "CPU-bound: the app's own work per row (encoding it once, its in-flight journal "
            "line, the queue) takes the core Postgres would otherwise have",
        ),
        common.Target(
            f"`vtai_record_batch`, {batch} rows/call",
            ">= 10,000 turns/s",
            f"{rates['batch']:,.0f}/s",
            rates["batch"] >= 10_000,
            "CPU-bound: Postgres and the client share 2 cores",
        ),
    ]
    notes = [
        f"{users:,} users; every row settles its own reservation (the real turn's path); "
        "rows are ~700 bytes of JSON with content.",
        "single: one `vtai_record` transaction per turn, the unbatched baseline (no target: "
        "every turn waits for its own WAL flush).",
        f"app: {in_flight:,} concurrent callers of `Ledger.record()`; each row is written to the "
        "process's in-flight journal before it is queued and marked done after its batch "
        "commits, so this includes the crash guarantee's cost. The queue sends whatever "
        "arrived while the previous batch was being written.",
        "Turns/s counts rows committed per second of wall time, database and client sharing "
        "the machine's 2 cores. Each mode starts after VACUUM ANALYZE and CHECKPOINT.",
        f"After all runs: {data['rows_total']:,} ledger rows; counters equal the ledger: "
        f"{data['counters_exact']}; aggregates equal the ledger: {data['aggregates_exact']}; "
        f"tokens still reserved: {data['reserved']}; reservations left: "
        f"{data['reservations']}. Replaying 200 rows of each run changed nothing.",
    ]
    return common.Section(
        "Ledger ingest",
        f"python benchmarks/ingest.py --rows {rows} --batch-rows {batch_rows} --batch {batch} "
        f"--writers {writers} --users {users} --in-flight {in_flight}",
        ["mode", "rows/call", "concurrency", "turns", "seconds", "turns/s"],
        results,
        notes,
        targets,
        data,
    )


async def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=20_000, help="turns in single-row mode")
    p.add_argument("--batch-rows", type=int, default=100_000, help="turns in batch mode")
    p.add_argument("--batch", type=int, default=100, help="rows per vtai_record_batch call")
    p.add_argument("--writers", type=int, default=8, help="concurrent connections")
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--in-flight", type=int, default=1000, help="concurrent turns in app mode")
    args = p.parse_args()
    async with common.database(args.db_url) as url:
        result = await bench(
            url,
            args.rows,
            args.batch_rows,
            args.batch,
            args.writers,
            args.users,
            args.in_flight,
        )
    common.finish(result, args.json)


if __name__ == "__main__":
    asyncio.run(main())
