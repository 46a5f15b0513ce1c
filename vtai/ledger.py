"""Writes request_logs rows through `vtai_record()`, or spools them when the database is down.

A row is never dropped: it is in the database (exactly once, keyed on litellm_call_id) or in
the fsynced spool, which a background task replays with backoff.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path
from typing import Any

import asyncpg

from vtai.db import UNAVAILABLE
from vtai.spool import ReplayResult, ReplayStopped, Spool

log = logging.getLogger(__name__)

# Postgres text and jsonb reject NUL, and JSON can't carry lone surrogates as UTF-8.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def sanitize(value: Any) -> Any:
    """Replace characters Postgres can't store with U+FFFD, recursively."""
    if isinstance(value, str):
        return _UNSTORABLE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {sanitize(str(k)): sanitize(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [sanitize(v) for v in value]
    return value


def is_bad_data(exc: BaseException) -> bool:
    """True when the database rejected the row itself; retrying would fail the same way."""
    return isinstance(
        exc, asyncpg.DataError | asyncpg.IntegrityConstraintViolationError | ValueError
    )


class Ledger:
    def __init__(
        self, pool: asyncpg.Pool, spool: Spool, period: str = "month", timeout: float = 5.0
    ):
        self.pool = pool
        self.spool = spool
        self.period = period
        self.timeout = timeout
        self._replayer: asyncio.Task | None = None
        self._wake = asyncio.Event()

    async def write(self, row: dict) -> bool:
        """Send one row to the database: True if new, False if it was already recorded."""
        # The timeout covers waiting for a connection too: a busy or wedged pool must send
        # the row to the spool, not hold it in memory. Sent as text so the result doesn't
        # depend on the pool's JSON codec.
        async with self.pool.acquire(timeout=self.timeout) as conn:
            return await conn.fetchval(
                "select public.vtai_record($1::text::jsonb, $2)",
                json.dumps(sanitize(row), default=str),
                self.period,
                timeout=self.timeout,
            )

    def hold(self, row: dict) -> Path:
        """Keep the row on local disk now, before any await, until record() settles it."""
        return self.spool.hold(sanitize(row))

    async def record(self, row: dict, held: Path | None = None) -> bool | None:
        """Write a row; on any failure spool it instead. None means spooled.

        While the write is pending the row sits in the spool's in-flight directory (`held`,
        if the caller already put it there), so a process killed mid-write leaves it for the
        next start-up to replay.
        """
        row = sanitize(row)
        held = held or self.spool.hold(row)
        result = await self._write_or_spool(row)
        held.unlink(missing_ok=True)
        return result

    async def _write_or_spool(self, row: dict) -> bool | None:
        try:
            return await self.write(row)
        except Exception as exc:
            if not isinstance(exc, UNAVAILABLE):
                log.error(
                    "ledger write rejected (%s: %s); spooling row %s",
                    type(exc).__name__,
                    exc,
                    row.get("litellm_call_id"),
                )
            await asyncio.to_thread(self.spool.append, row)
            self._wake.set()
            return None

    async def replay(self) -> ReplayResult:
        return await self.spool.replay(self.write, is_bad_data)

    async def recover(self) -> int:
        """At start-up: spool the rows a dead process was still writing, for replay."""
        return await asyncio.to_thread(self.spool.recover_inflight)

    def start_replayer(self, max_delay: float = 60.0) -> None:
        """Replay the spool now and whenever rows wait, backing off while the DB is down."""
        if self._replayer is None:
            self._replayer = asyncio.create_task(self._replay_loop(max_delay))

    async def _replay_loop(self, max_delay: float) -> None:
        delay = 1.0
        while True:
            if self.spool.pending_files():
                try:
                    result = await self.replay()
                    if result.recorded or result.quarantined:
                        log.info("spool replayed: %s", result)
                    delay = 1.0
                except ReplayStopped as exc:
                    log.warning("spool replay paused, database unavailable: %s", exc)
                    delay = min(delay * 2, max_delay)
                except Exception:
                    log.exception("spool replay failed")
                    delay = min(delay * 2, max_delay)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            except TimeoutError:
                pass

    async def stop(self) -> None:
        if self._replayer is not None:
            self._replayer.cancel()
            await asyncio.gather(self._replayer, return_exceptions=True)
            self._replayer = None
