"""Plan changes, heard at once: LISTEN on the channel the plan tables NOTIFY
(supabase/migrations/functions/30_plan_changes.sql).

A chat's reservation taken ahead (vtai.metering.ahead) was granted under the plan as it was:
the model allowed then, its weight then. When a tier, a weight rule, the catalogue or a user's
tier changes, every process hears it and gives those reservations back, so each chat's next
turn asks vtai_reserve() again under the plan as it is now. Reservations taken ahead are used
only while this connection is live: without it (REST-only mode, or while the database is
away) a turn always reserves for itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import asyncpg

log = logging.getLogger(__name__)

CHANNEL = "vtai_plans"
# Seconds between attempts to listen again after the connection is lost.
RETRY = 5.0
# Seconds between checks that the connection still answers: a half-open TCP connection never
# says it is gone, and a listener on it would hear nothing while it counted as live.
HEARTBEAT = 15.0
# Supabase's transaction pooler: it passes no NOTIFY to a LISTEN.
POOLER_PORT = 6543


class PlanWatch:
    def __init__(self, url: str, on_change: Callable[[], None]):
        self.url = url
        self.on_change = on_change
        self.live = False
        self._conn: asyncpg.Connection | None = None
        self._retry: asyncio.Task | None = None
        self._beat: asyncio.Task | None = None
        self._stopped = False
        self.retry = RETRY

    async def start(self) -> PlanWatch:
        from urllib.parse import urlsplit

        try:
            port = urlsplit(self.url).port
        except ValueError:
            port = None
        if port == POOLER_PORT:
            log.warning(
                "the database URL is Supabase's transaction pooler (port %d), which passes no "
                "NOTIFY: reserving ahead is off; use the session or direct port (5432) to turn "
                "it on",
                POOLER_PORT,
            )
            return self
        try:
            await self._listen()
        except Exception as exc:
            log.warning("not listening for plan changes (%s); retrying", type(exc).__name__)
            self._schedule()
        return self

    async def _listen(self) -> None:
        conn = await asyncpg.connect(self.url)
        conn.add_termination_listener(self._lost)
        await conn.add_listener(CHANNEL, self._heard)
        self._conn, self.live = conn, True
        if self._beat is None or self._beat.done():
            self._beat = asyncio.create_task(self._heartbeat())
        # Anything may have changed while nobody listened.
        self.on_change()

    async def _heartbeat(self) -> None:
        while not self._stopped:
            await asyncio.sleep(HEARTBEAT)
            conn = self._conn
            if conn is None:
                continue
            try:
                await conn.fetchval("select 1", timeout=HEARTBEAT / 3)
            except Exception:
                self._lost(conn)
                conn.terminate()

    def _heard(self, _conn, _pid, _channel, payload: str) -> None:
        log.info("plan change (%s): reservations taken ahead go back", payload)
        self.on_change()

    def _lost(self, conn) -> None:
        if conn is not self._conn:
            return  # a connection already given up (or stop() closing it)
        self.live, self._conn = False, None
        self.on_change()
        if not self._stopped:
            log.warning("the plan-change connection was lost; turns reserve for themselves")
            self._schedule()

    def _schedule(self) -> None:
        if self._retry is None or self._retry.done():
            self._retry = asyncio.create_task(self._again())

    async def _again(self) -> None:
        while not self._stopped and not self.live:
            await asyncio.sleep(self.retry)
            try:
                await self._listen()
                log.info("listening for plan changes again")
            except Exception:
                continue

    async def stop(self) -> None:
        self._stopped, self.live = True, False
        for task in (self._retry, self._beat):
            if task is not None:
                task.cancel()
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.close()
