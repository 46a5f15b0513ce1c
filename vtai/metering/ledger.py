"""The ledger's queue: rows go to the database in batches, or to the spool when it is down.

A row is never dropped: it is in the database (exactly once, keyed on litellm_call_id) or in
the fsynced spool, which the replayer (vtai.metering.replay) writes once the database answers.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

import asyncpg

from vtai.metering.encoding import encode, sanitize
from vtai.metering.journal import Hold, release_all
from vtai.metering.ports import LedgerStore
from vtai.metering.postgres import PostgresStore
from vtai.metering.replay import Replayer
from vtai.metering.spool import Spool
from vtai.ops import metrics

log = logging.getLogger(__name__)


class Ledger:
    """Rows queue here and go to the database in batches: whatever arrived while the previous
    batch was being written goes in the next one, so a quiet app writes each row at once and a
    busy one pays one transaction (and one WAL flush) per batch instead of per turn."""

    def __init__(
        self,
        store: asyncpg.Pool | LedgerStore,
        spool: Spool,
        period: str = "month",
        timeout: float = 5.0,
        batch_size: int = 100,
        writers: int = 4,
    ):
        # A LedgerStore (the Supabase REST store is one); a pool gets the direct Postgres store.
        self.store = (
            PostgresStore(store, period, timeout) if isinstance(store, asyncpg.Pool) else store
        )
        self.spool = spool
        self.batch_size = batch_size
        self.writers = writers
        self._queue: deque[tuple[Hold, asyncio.Future]] = deque()
        self._flushers: set[asyncio.Task] = set()
        self.replayer = Replayer(spool, self.write, self.store.is_bad_data)

    async def write(self, row: dict) -> bool:
        """Send one row now: True if new, False if it was already recorded. Raises on failure."""
        new = (await self.store.record_batch([sanitize(row)]))[0]
        metrics.rows_landed([row], [new])
        return new

    def hold(self, row: dict) -> Hold:
        """Keep the row on local disk now, before any await, until record() settles it."""
        return self.spool.hold(*encode(row))

    def in_flight(self, row: dict, completion_price: float | None) -> None:
        """A turn sent its prompt: if the process dies before the turn's own row is held,
        recovery settles its reservation with `row` (vtai.metering.journal.Journal.in_flight)."""
        try:
            self.spool.journal().in_flight(row["reservation_id"], row, completion_price)
        except OSError as exc:
            log.warning("journal write failed (%s): a killed turn would be released", exc)

    def streamed(self, reservation_id: str, completion_tokens: int) -> None:
        try:
            self.spool.journal().streamed(reservation_id, completion_tokens)
        except OSError as exc:
            log.warning("journal write failed (%s)", exc)

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
            metrics.rows_landed([h.row for h in holds], results)
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)

    async def _send(self, holds: list[Hold]) -> list[bool]:
        with metrics.ledger_batch(len(holds)):
            return await self.store.record_encoded([h.text for h in holds])

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
            self.replayer.wake()
            return [None] * len(holds)

    async def stop(self) -> None:
        if self._flushers:
            await asyncio.gather(*self._flushers, return_exceptions=True)
        await self.replayer.stop()
        self.spool.close()
