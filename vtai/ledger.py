"""Writes request_logs rows through `vtai_record()`, or spools them when the database is down.

A row is never dropped: it is in the database (exactly once, keyed on litellm_call_id) or in
the fsynced spool, which a background task replays with backoff.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import deque
from typing import Any

import asyncpg

from vtai.db import UNAVAILABLE
from vtai.inflight import Hold, release_all
from vtai.spool import ReplayResult, ReplayStopped, Spool

log = logging.getLogger(__name__)

# Postgres text and jsonb reject NUL, and JSON can't carry lone surrogates as UTF-8.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def sanitize(value: Any) -> Any:
    """Replace characters Postgres can't store with U+FFFD, recursively."""
    if isinstance(value, dict | list):
        return encode(value)[0]
    return _replace_unstorable(value)


def encode(row: Any) -> tuple[Any, str]:
    """The storable row and its JSON text, encoded once for the journal and the database."""
    try:
        text = json.dumps(row, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = None
    # The C encoder writes NUL as \u0000 and leaves lone surrogates as they are, so one look
    # at the text replaces a Python walk of every string; a false alarm only costs the walk.
    if text is None or "\\u0000" in text or _SURROGATE.search(text):
        row = _replace_unstorable(row)
        text = json.dumps(row, ensure_ascii=False, default=str)
    return row, text


def _replace_unstorable(value: Any) -> Any:
    if isinstance(value, str):
        return _UNSTORABLE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_replace_unstorable(str(k)): _replace_unstorable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_replace_unstorable(v) for v in value]
    return value


def is_bad_data(exc: BaseException) -> bool:
    """True when the database rejected the row itself; retrying would fail the same way."""
    return isinstance(
        exc, asyncpg.DataError | asyncpg.IntegrityConstraintViolationError | ValueError
    )


class PostgresStore:
    """The ledger's database: `vtai_record_batch()` over the app's asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool, period: str = "month", timeout: float = 5.0):
        self.pool = pool
        self.period = period
        self.timeout = timeout

    async def record_batch(self, rows: list[dict]) -> list[bool]:
        """One transaction for all rows: True for each row that is new, in order."""
        return await self.record_encoded([encode(row)[1] for row in rows])

    async def record_encoded(self, texts: list[str]) -> list[bool]:
        """record_batch() for rows already encoded by encode()."""
        # The timeout covers waiting for a connection too: a busy or wedged pool must send
        # the rows to the spool, not hold them in memory. Sent as text so the result doesn't
        # depend on the pool's JSON codec.
        async with self.pool.acquire(timeout=self.timeout) as conn:
            result = await conn.fetchval(
                "select public.vtai_record_batch($1::text::jsonb, $2)",
                "[" + ",".join(texts) + "]",
                self.period,
                timeout=self.timeout,
            )
        return list(result)

    @staticmethod
    def is_unavailable(exc: BaseException) -> bool:
        return isinstance(exc, UNAVAILABLE)

    is_bad_data = staticmethod(is_bad_data)


class Ledger:
    """Rows queue here and go to the database in batches: whatever arrived while the previous
    batch was being written goes in the next one, so a quiet app writes each row at once and a
    busy one pays one transaction (and one WAL flush) per batch instead of per turn."""

    def __init__(
        self,
        store: asyncpg.Pool | PostgresStore,
        spool: Spool,
        period: str = "month",
        timeout: float = 5.0,
        batch_size: int = 100,
        writers: int = 4,
    ):
        # Anything with record_batch / is_unavailable / is_bad_data will do (the Supabase
        # REST store is one); a pool gets the direct Postgres store.
        self.store = (
            PostgresStore(store, period, timeout) if isinstance(store, asyncpg.Pool) else store
        )
        self.spool = spool
        self.batch_size = batch_size
        self.writers = writers
        self._queue: deque[tuple[Hold, asyncio.Future]] = deque()
        self._flushers: set[asyncio.Task] = set()
        self._replayer: asyncio.Task | None = None
        self._wake = asyncio.Event()

    async def write(self, row: dict) -> bool:
        """Send one row now: True if new, False if it was already recorded. Raises on failure."""
        return (await self.store.record_batch([sanitize(row)]))[0]

    def hold(self, row: dict) -> Hold:
        """Keep the row on local disk now, before any await, until record() settles it."""
        return self.spool.hold(*encode(row))

    async def record(self, row: dict, held: Hold | None = None) -> bool | None:
        """Write a row with the next batch; on any failure spool it instead. None: spooled.

        While the write is pending the row sits in the spool's in-flight journal (`held`, from
        hold(row), if the caller already put it there), so a process killed mid-write leaves
        it for the next start-up to replay.
        """
        held = held or self.hold(row)
        future = asyncio.get_running_loop().create_future()
        self._queue.append((held, future))
        if len(self._flushers) < self.writers:
            task = asyncio.create_task(self._flush())
            self._flushers.add(task)
            task.add_done_callback(self._flushers.discard)
        # A cancelled caller cancels only this future: the row stays in its batch.
        return await future

    async def _flush(self) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), self.batch_size))]
            holds = [held for held, _ in batch]
            try:
                results = await self._write_or_spool(holds)
            except BaseException as exc:
                # Not even the spool took them: their in-flight copies stay for the next start.
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                continue
            release_all(holds)
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)

    async def _send(self, holds: list[Hold]) -> list[bool]:
        encoded = getattr(self.store, "record_encoded", None)
        if encoded is not None:
            return await encoded([h.text for h in holds])
        return await self.store.record_batch([h.row for h in holds])

    async def _write_or_spool(self, holds: list[Hold]) -> list[bool | None]:
        try:
            return await self._send(holds)
        except Exception as exc:
            if len(holds) > 1 and self.store.is_bad_data(exc):
                # One bad row must not send its batch-mates to the spool: write them singly.
                return [r for held in holds for r in await self._write_or_spool([held])]
            if not self.store.is_unavailable(exc):
                log.error(
                    "ledger write rejected (%s: %s); spooling %d row(s), first %s",
                    type(exc).__name__,
                    exc,
                    len(holds),
                    holds[0].row.get("litellm_call_id"),
                )
            await asyncio.to_thread(self.spool.append_many, [h.row for h in holds])
            self._wake.set()
            return [None] * len(holds)

    async def replay(self) -> ReplayResult:
        return await self.spool.replay(self.write, self.store.is_bad_data)

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
        if self._flushers:
            await asyncio.gather(*self._flushers, return_exceptions=True)
        if self._replayer is not None:
            self._replayer.cancel()
            await asyncio.gather(self._replayer, return_exceptions=True)
            self._replayer = None
        self.spool.close()
