"""The content purge: prompt and answer text older than VTAI_CONTENT_RETENTION_DAYS goes, from
the ledger and from chat history, in short batches. Tokens, cost, status and times stay.

One process at a time: the purge holds a session advisory lock on its own connection, and a
second caller (another app process, `vtai retention run`) finds it taken and skips. Each batch
is one call of a function in supabase/migrations/functions/70_retention.sql, its own short
transaction, so a turn's reserve or settle never waits for more than one batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

# pg_try_advisory_lock key: "vtar" (the migrations' is "vtai").
LOCK_KEY = 0x76746172
BATCH = 2000

# progress(what, done, total, purged): `what` is "ledger" or "history"; total None if unknown.
Progress = Callable[[str, int, int | None, int], None]


@dataclass
class Purged:
    cutoff: datetime
    ledger_rows: int = 0
    steps: int = 0
    batches: int = 0
    seconds: float = 0.0
    longest_batch: float = 0.0
    batch_times: list[float] = field(default_factory=list, repr=False)


async def purge(
    conn,
    days: int,
    *,
    now: datetime | None = None,
    batch: int = BATCH,
    progress: Progress | None = None,
) -> Purged | None:
    """Purge text older than `days` days; None when another process is purging.

    `conn` must be a connection of its own (not returned to a pool while the lock is held)."""
    if not await conn.fetchval("select pg_try_advisory_lock($1)", LOCK_KEY):
        return None
    try:
        cutoff = (now or datetime.now(UTC)) - timedelta(days=days)
        result = Purged(cutoff=cutoff)
        started = time.perf_counter()
        await _ledger(conn, result, batch, progress)
        await _history(conn, result, batch, progress)
        result.seconds = time.perf_counter() - started
        return result
    finally:
        await conn.execute("select pg_advisory_unlock($1)", LOCK_KEY)


async def _timed(result: Purged, call):
    t0 = time.perf_counter()
    value = await call
    spent = time.perf_counter() - t0
    result.batches += 1
    result.longest_batch = max(result.longest_batch, spent)
    result.batch_times.append(spent)
    return value


async def _ledger(conn, result: Purged, batch: int, progress: Progress | None) -> None:
    # The id range of the rows old enough, read from the (created_at, id) index; ids follow
    # created_at closely but not exactly (a spool replay inserts old rows late), so the range
    # is walked whole and each batch checks created_at again.
    lo, hi = await conn.fetchrow(
        "select min(id), max(id) from public.request_logs where created_at < $1", result.cutoff
    )
    if lo is None:
        return
    total = hi - lo + 1
    shown = time.monotonic()
    for start in range(lo, hi + 1, batch):
        result.ledger_rows += await _timed(
            result,
            conn.fetchval(
                "select public.vtai_retention_purge_ledger($1, $2, $3)",
                result.cutoff,
                start,
                min(start + batch, hi + 1),
            ),
        )
        if progress and time.monotonic() - shown >= 1:
            shown = time.monotonic()
            progress("ledger", min(start + batch, hi + 1) - lo, total, result.ledger_rows)
    if progress:
        progress("ledger", total, total, result.ledger_rows)


async def _history(conn, result: Purged, batch: int, progress: Progress | None) -> None:
    after_created, after_id, scanned = None, None, 0
    shown = time.monotonic()
    while True:
        row = await _timed(
            result,
            conn.fetchrow(
                "select * from public.vtai_retention_purge_steps($1, $2, $3, $4)",
                result.cutoff,
                after_created,
                after_id,
                batch,
            ),
        )
        if not row["scanned"]:
            break
        scanned += row["scanned"]
        result.steps += row["purged"]
        after_created, after_id = row["last_created"], row["last_id"]
        if progress and time.monotonic() - shown >= 1:
            shown = time.monotonic()
            progress("history", scanned, None, result.steps)
    if progress and scanned:
        progress("history", scanned, scanned, result.steps)
