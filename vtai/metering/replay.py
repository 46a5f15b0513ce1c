"""The spool's replayer: rows that waited on disk for the database go in once it answers.

At start-up it also takes the rows a dead process was still writing (its journal), and
afterwards it replays whenever rows wait, backing off while the database stays down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from vtai.metering.spool import ReplayResult, ReplayStopped, Spool
from vtai.ops import metrics

log = logging.getLogger(__name__)


class Replayer:
    def __init__(
        self,
        spool: Spool,
        write: Callable[[dict], Awaitable[bool]],
        is_bad_data: Callable[[BaseException], bool],
    ):
        self.spool = spool
        self.write = write
        self.is_bad_data = is_bad_data
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()

    async def replay(self) -> ReplayResult:
        """Write what the spool holds now (each row once: writes are keyed on the call id)."""
        return await self.spool.replay(self.write, self.is_bad_data)

    async def recover(self) -> int:
        """At start-up: spool the rows a dead process was still writing, for replay."""
        return await asyncio.to_thread(self.spool.recover_inflight)

    def wake(self) -> None:
        """Rows were just spooled: look again now rather than at the next backoff."""
        self._wake.set()

    def start(self, max_delay: float = 60.0) -> None:
        """Replay the spool now and whenever rows wait, backing off while the DB is down."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(max_delay))

    async def _loop(self, max_delay: float) -> None:
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
            await metrics.publish(self.spool)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            except TimeoutError:
                pass

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
