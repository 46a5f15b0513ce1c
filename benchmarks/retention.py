"""The content purge (VTAI_CONTENT_RETENTION_DAYS) on a large ledger, with turns running.

Seeds `--rows` ledger rows with COPY (nine in ten older than the retention, each with a prompt
and an answer), counters to match, then runs the purge in batches while one user's
reserve + settle loop runs beside it. Reports rows purged per second, the longest batch (the
longest any lock is held), turns' latency before and during the purge, and whether billing
totals stayed exact.

    python benchmarks/retention.py [--db-url URL] [--rows 1000000] [--batch 2000]
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.common import ms, pct  # noqa: E402
from benchmarks.gate_latency import MODEL, PRICES, PROMPT, settle_row  # noqa: E402
from vtai.db.connection import Database  # noqa: E402
from vtai.metering.gate import Gate  # noqa: E402
from vtai.metering.ledger import Ledger  # noqa: E402
from vtai.metering.spool import Spool  # noqa: E402
from vtai.retention import purge  # noqa: E402
from vtai.settings import Settings  # noqa: E402

DAYS = 30
USERS = 100
COPY_BATCH = 100_000
COLUMNS = [
    "litellm_call_id",
    "created_at",
    "end_user",
    "session_id",
    "model",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "total_cost",
    "period_start",
    "messages",
    "response",
    "weight",
    "counted_tokens",
]
MESSAGES = json.dumps([{"role": "user", "content": "Tell me about the history of Paris. " * 8}])
RESPONSE = json.dumps("Paris grew from a Gallic settlement on the Seine into a capital. " * 12)
TOTALS = (
    "select (select sum(total_tokens) from request_logs), (select sum(total_cost) from"
    " request_logs), (select sum(used) from usage_counters), (select sum(total_tokens) from"
    " usage_aggregates where granularity = 'day'), (select sum(cost) from usage_aggregates"
    " where granularity = 'hour')"
)


async def seed(conn: asyncpg.Connection, rows: int) -> None:
    users = await common.add_users(conn, USERS)
    now = datetime.now(UTC)
    done = 0
    while done < rows:
        n = min(COPY_BATCH, rows - done)
        records = []
        for i in range(done, done + n):
            # Nine in ten past the retention, spread over 31..120 days ago; ids follow time.
            old = i % 10 != 9
            age = timedelta(days=120 - 89 * i / rows) if old else timedelta(hours=i % 500)
            at = now - age
            start = datetime(at.year, at.month, 1, tzinfo=UTC)
            records.append(
                (
                    uuid.uuid4().hex,
                    at,
                    users[i % USERS],
                    "chat-bench",
                    MODEL,
                    "success",
                    120,
                    180,
                    300,
                    0.000126,
                    start,
                    MESSAGES,
                    RESPONSE,
                    1,
                    300,
                )
            )
        await conn.copy_records_to_table("request_logs", records=records, columns=COLUMNS)
        done += n
        print(f"seeded {done:,} rows", file=sys.stderr, flush=True)
    await conn.execute(
        "insert into usage_counters (end_user, period_start, used, used_raw, cost_used)"
        " select end_user, period_start, sum(counted_tokens), sum(total_tokens), sum(total_cost)"
        " from request_logs group by 1, 2"
    )
    await conn.execute("vacuum analyze")
    await conn.execute("checkpoint")
    await asyncio.to_thread(os.sync)


async def turns_until(gate: Gate, ledger: Ledger, user, stop: asyncio.Event, n: int | None):
    times = []
    while not stop.is_set() and (n is None or len(times) < n):
        t0 = time.perf_counter()
        grant = await gate.reserve(user, PROMPT, 512, model=MODEL, prices=PRICES)
        assert grant.granted, grant
        assert await ledger.write(settle_row(user, grant))
        times.append(time.perf_counter() - t0)
    return times


async def bench(db_url: str, rows: int, batch: int) -> common.Section:
    with common.data_dir() as tmp:
        settings = Settings(database_url=db_url, data_dir=Path(tmp), model=MODEL)
        db = await Database(settings).open(migrate=False)
        conn = await asyncpg.connect(db_url)
        try:
            t0 = time.perf_counter()
            await seed(conn, rows)
            seeded = time.perf_counter() - t0
            (user,) = await common.add_users(conn, 1)
            gate, ledger = Gate(db.gate_pool), Ledger(db.pool, Spool(settings.spool_dir))
            idle = await turns_until(gate, ledger, user, asyncio.Event(), 300)
            before = await conn.fetchrow(TOTALS)
            stop = asyncio.Event()
            loop = asyncio.create_task(turns_until(gate, ledger, user, stop, None))
            purger = await asyncpg.connect(db_url)
            try:
                done = await purge.purge(purger, DAYS, batch=batch)
            finally:
                await purger.close()
            stop.set()
            busy = await loop
            after = await conn.fetchrow(TOTALS)
            # The turns made during the purge add to every total alike; nothing else may move.
            grew = [a - b for a, b in zip(after, before, strict=True)]
            exact = (
                grew[0] == grew[2] == grew[3]
                and grew[1] == grew[4]
                and await common.counters_exact(conn)
                and await conn.fetch("select * from vtai_verify_aggregates()") == []
            )
            left = await conn.fetchval(
                "select count(*) from request_logs where created_at < now() - $1::interval"
                " and (messages is not null or response is not null)",
                timedelta(days=DAYS),
            )
        finally:
            await conn.close()
            await db.close()
    rate = done.ledger_rows / done.seconds if done.seconds else 0
    p50_batch = pct(done.batch_times, 50)
    worst_turn = max(busy) if busy else 0.0
    room = done.longest_batch + max(idle)
    data = {
        "rows": rows,
        "purged": done.ledger_rows,
        "seconds": done.seconds,
        "rows_per_s": rate,
        "batches": done.batches,
        "longest_batch": done.longest_batch,
        "turns_during": len(busy),
        "turn_max_during": worst_turn,
        "turn_max_idle": max(idle),
        "exact": bool(exact),
        "left": left,
        "seed_s": seeded,
    }
    return common.Section(
        title="Retention purge",
        command=f"python benchmarks/retention.py --rows {rows} --batch {batch}",
        columns=[
            "ledger rows",
            "purged",
            "rows/s",
            "batches",
            "batch p50",
            "longest batch",
            "turn p50 idle",
            "turn p50 during",
            "turn max during",
            "turns during",
        ],
        rows=[
            [
                f"{rows:,}",
                f"{done.ledger_rows:,}",
                f"{rate:,.0f}",
                f"{done.batches:,}",
                ms(p50_batch),
                ms(done.longest_batch),
                ms(pct(idle, 50)),
                ms(pct(busy, 50)) if busy else "-",
                ms(worst_turn),
                f"{len(busy):,}",
            ]
        ],
        notes=[
            f"{batch:,} ledger ids per batch, each its own transaction; rows past {DAYS} days"
            " lose messages, response and the error's message; tokens, cost and times stay",
            f"seeded with COPY in {seeded:.0f} s ({USERS} users, nine rows in ten past the"
            " retention); one user's reserve + settle loop ran beside the purge",
            f"counters and aggregates equal the ledger afterwards: {'yes' if exact else 'NO'};"
            f" rows past the retention still holding text: {left:,}",
        ],
        targets=[
            common.Target(
                "billing totals after the purge",
                "counters and aggregates equal the ledger",
                "equal" if exact else "differ",
                bool(exact),
                "a purge changed an accounted column",
            ),
            common.Target(
                "a turn during the purge",
                "waits at most one batch",
                f"max {ms(worst_turn)} (longest batch {ms(done.longest_batch)}"
                f" + slowest idle turn {ms(max(idle))} = {ms(room)})",
                worst_turn <= room,
                "a turn waited longer than one batch",
            ),
        ],
        data=data,
    )


async def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=purge.BATCH)
    args = p.parse_args()
    async with common.database(args.db_url) as url:
        section = await bench(url, args.rows, args.batch)
    common.finish(section, args.json)


if __name__ == "__main__":
    asyncio.run(main())
