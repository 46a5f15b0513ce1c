"""The spool's replayer: rows that waited on disk for the database go in once it answers.

At start-up it also takes the rows a dead process was still writing (its journal) and
releases the reservations it held; afterwards it replays whenever rows wait, backing off while
the database stays down. With sibling processes (`peers`, vtai.cluster.layout) it also
recovers a sibling's journal as soon as that sibling is dead, without waiting for its restart.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from vtai.metering import journal
from vtai.metering.spool import INFLIGHT, ReplayResult, ReplayStopped, Spool
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
        # Set by vtai.services: vtai_release for a dead process's reservations (None: TTL).
        self.release: Callable[[uuid.UUID, uuid.UUID], Awaitable[bool]] | None = None
        # Sibling processes' journal directories, looked at on every pass of the loop.
        self.peers: Callable[[], list[Path]] = list

    async def replay(self) -> ReplayResult:
        """Write what the spool holds now (each row once: writes are keyed on the call id)."""
        return await self.spool.replay(self.write, self.is_bad_data)

    async def recover(self, peers: bool = True) -> int:
        """Spool the rows dead processes were still writing, for replay, and release their
        reservations no row settles: this process's directory (at start-up) and, with
        `peers`, its siblings'. A live process's journal is locked and left alone."""
        directories = [self.spool.directory / INFLIGHT, *(self.peers() if peers else [])]
        orphans: list[journal.Orphan] = []
        moved = 0
        for directory in directories:
            moved += await asyncio.to_thread(
                journal.recover,
                directory,
                self.spool.append_many,
                self.spool.quarantine,
                orphans.extend,
            )
        if moved:
            log.warning("recovered %d in-flight row(s) of a dead process", moved)
            self.wake()
        if orphans and self.release is not None:
            released = await asyncio.gather(
                *(self.release(uuid.UUID(o.reservation_id), uuid.UUID(o.user_id)) for o in orphans),
                return_exceptions=True,
            )
            log.warning(
                "released %d of %d reservation(s) a dead process held",
                sum(r is True for r in released),
                len(orphans),
            )
        return moved

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
            try:
                await self.recover()
            except Exception:
                log.exception("recovering a dead process's journal failed")
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
