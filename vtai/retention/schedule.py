"""The purge inside the app: hourly while VTAI_CONTENT_RETENTION_DAYS is set. Every process
runs the schedule; the purge's advisory lock lets one of them work at a time."""

from __future__ import annotations

import asyncio
import logging

from vtai.db.connection import connect
from vtai.retention import purge

log = logging.getLogger(__name__)

EVERY = 3600.0
FIRST = 60.0


async def purge_once(services, settings) -> purge.Purged | None:
    # A connection of its own: the advisory lock must never go back to a pool with it.
    conn = await connect(services.db.url)
    try:
        return await purge.purge(conn, settings.content_retention_days)
    finally:
        await conn.close()


async def purge_forever(services, settings, every: float = EVERY, first: float = FIRST) -> None:
    """purge_once() every `every` seconds until cancelled; nothing when retention is unset."""
    if settings.content_retention_days is None:
        return
    if services.db is None:
        log.warning(
            "VTAI_CONTENT_RETENTION_DAYS is set but nothing is purged: the purge needs a"
            " database URL (VTAI_DATABASE_URL), not the Supabase REST API"
        )
        return
    await asyncio.sleep(first)
    while True:
        try:
            done = await purge_once(services, settings)
            if done is None:
                log.info("retention: another process is purging; skipped")
            elif done.ledger_rows or done.steps:
                log.info(
                    "retention: purged the text of %d ledger rows and %d chat steps older than"
                    " %s (%.1fs, longest batch %.0f ms)",
                    done.ledger_rows,
                    done.steps,
                    f"{done.cutoff:%Y-%m-%d %H:%M}",
                    done.seconds,
                    done.longest_batch * 1000,
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning(
                "retention purge failed (%s: %s); next try in %ss",
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
                every,
            )
        await asyncio.sleep(every)
