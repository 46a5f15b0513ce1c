"""Sending the operator's webhooks: the outbox in Postgres and the process's own queue.

One loop per app process (started by vtai.ui.chat at start-up when VTAI_WEBHOOK_URLS is set).
Each pass claims due deliveries (public.vtai_outbox_claim: FOR UPDATE SKIP LOCKED, each leased
in the claiming transaction), sends them after the claim has committed, and reports each result
(public.vtai_outbox_done), which sets the backoff. Any number of processes may run it on one
database: a claimed row is invisible to the others until its lease ends, and a process that dies
mid-send leaves its rows to be sent again after the lease, so delivery is at least once. The HTTP
timeout is well inside the lease, so two senders never hold one delivery at the same moment.

The same loop watches this process's spool: past VTAI_WEBHOOK_SPOOL_ROWS rows or
VTAI_WEBHOOK_SPOOL_MINUTES minutes it queues one `spool.backlog` event in the local queue
(vtai.notify.local: the database is what is down), and a new one only after the spool has
emptied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid

import httpx

from vtai.notify import outbox, signing
from vtai.notify.local import LocalQueue
from vtai.notify.outbox import Calls

log = logging.getLogger(__name__)

LEASE = 60.0
POLL = 2.0
BACKOFF = 5.0
BATCH = 20
SPOOL_CHECK = 10.0

# The loop of this process, if any: notices poke it so their events leave at once.
current: Deliverer | None = None


def queue_for(settings) -> LocalQueue:
    """The process's own queue, next to its spool."""
    return LocalQueue(settings.spool_dir.parent / "webhooks")


class Deliverer:
    def __init__(
        self,
        calls: Calls | None,
        urls: tuple[str, ...],
        secret: str,
        queue: LocalQueue,
        *,
        spool=None,
        spool_rows: int = 1000,
        spool_minutes: int = 10,
        lease: float = LEASE,
        poll: float = POLL,
        backoff: float = BACKOFF,
        batch: int = BATCH,
        spool_check: float = SPOOL_CHECK,
    ):
        self.calls = calls
        self.urls = urls
        self.secret = secret
        self.queue = queue
        self.spool = spool
        self.spool_rows = spool_rows
        self.spool_minutes = spool_minutes
        self.lease = lease
        self.poll = poll
        self.backoff = backoff
        self.batch = batch
        self.spool_check = spool_check
        # Inside the lease: a send still under way when its lease ends would be a second sender.
        self.timeout = min(10.0, lease / 3)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._endpoints_set = False
        self._spool_checked = 0.0
        self._client: httpx.AsyncClient | None = None

    def poke(self) -> None:
        self._wake.set()

    async def _send(self, event: dict, url: str) -> tuple[int | None, str | None]:
        payload = signing.body(event)
        try:
            # A deadline for the whole send: httpx's timeout is per phase, and a receiver that
            # trickles its answer would keep the send going past its lease.
            async with asyncio.timeout(self.timeout):
                r = await self._client.post(
                    url, content=payload, headers=signing.headers(self.secret, event, payload)
                )
        except TimeoutError:
            return None, f"no answer within {self.timeout:g} s"
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}"[:300] or type(exc).__name__
        if 200 <= r.status_code < 300:
            return r.status_code, None
        return r.status_code, f"HTTP {r.status_code}: {' '.join(r.text.split())[:200]}"

    async def _database_pass(self) -> int:
        if self.calls is None:
            return 0
        if not self._endpoints_set:
            await outbox.set_endpoints(self.calls, self.urls)
            self._endpoints_set = True
        claimed = await outbox.claim(self.calls, self.batch, self.lease)

        async def one(c: outbox.Claimed) -> None:
            status, error = await self._send(c.event(), c.url)
            if error is not None:
                log.warning("webhook %s (%s) to %s failed: %s", c.event_id, c.type, c.url, error)
            await outbox.done(self.calls, c, status, error, self.backoff)

        await asyncio.gather(*(one(c) for c in claimed))
        return len(claimed)

    async def _local_pass(self) -> int:
        claimed = await asyncio.to_thread(self.queue.claim, self.lease)

        async def one(event: dict, url: str, attempt: int) -> None:
            _, error = await self._send(event, url)
            if error is not None:
                log.warning(
                    "webhook %s (%s) to %s failed: %s", event["id"], event["type"], url, error
                )
            await asyncio.to_thread(self.queue.done, event["id"], url, attempt, error, self.backoff)

        await asyncio.gather(*(one(*c) for c in claimed))
        return len(claimed)

    async def check_spool(self) -> bool:
        """Queue a spool.backlog event when the spool is past a threshold: True if queued."""
        if self.spool is None:
            return False
        from vtai.ops import backlog

        state = await asyncio.to_thread(backlog.of, self.spool)
        episode = f"spool.backlog:{self.spool.directory}"
        if state.rows == 0:
            await asyncio.to_thread(self.queue.end_episode, episode)
            return False
        age = state.oldest_age or 0.0
        if state.rows <= self.spool_rows and age <= self.spool_minutes * 60:
            return False
        event = {
            "id": str(uuid.uuid4()),
            "type": "spool.backlog",
            "created": int(time.time()),
            "data": {
                "host": socket.gethostname(),
                "spool": str(self.spool.directory),
                "rows": state.rows,
                "oldest_age_seconds": round(age, 1),
                "rows_over": self.spool_rows,
                "minutes_over": self.spool_minutes,
            },
        }
        added = await asyncio.to_thread(self.queue.add, event, self.urls, episode)
        if added:
            log.warning(
                "spool backlog: %d rows, oldest %.0f s; spool.backlog event queued", state.rows, age
            )
        return added

    async def run_once(self) -> int:
        """One pass: the database's due deliveries, then the local queue's. How many were sent."""
        sent = 0
        try:
            sent += await self._database_pass()
        except Exception as exc:
            # The database is down or refused: the local queue still goes, the next pass retries.
            log.warning("webhook outbox unreadable (%s)", type(exc).__name__)
        now = time.monotonic()
        if now - self._spool_checked >= self.spool_check:
            self._spool_checked = now
            try:
                await self.check_spool()
            except Exception:
                log.exception("spool backlog check failed")
        sent += await self._local_pass()
        return sent

    async def _loop(self) -> None:
        while True:
            try:
                sent = await self.run_once()
            except Exception:
                log.exception("webhook delivery pass failed")
                sent = 0
            if sent:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll)
            self._wake.clear()

    def open(self) -> Deliverer:
        """Ready to send (run_once); start() also runs the loop."""
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout, follow_redirects=False)
        return self

    def start(self) -> Deliverer:
        self.open()
        self._task = asyncio.create_task(self._loop(), name="vtai-webhooks")
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None


async def start(services) -> Deliverer | None:
    """The process's delivery loop, or None (webhooks off: said in one line)."""
    global current
    s = services.settings
    calls = outbox.calls_for(services)
    if not s.webhook_urls:
        # The URLs other processes deliver to are left alone: one process started without the
        # variable must not turn webhooks off for all (`vtai webhooks off` does that).
        log.info("webhooks are off: set VTAI_WEBHOOK_URLS (and VTAI_WEBHOOK_SECRET) to send them")
        return None
    current = Deliverer(
        calls,
        s.webhook_urls,
        s.webhook_secret.get_secret_value(),
        queue_for(s),
        spool=services.ledger.spool,
        spool_rows=s.webhook_spool_rows,
        spool_minutes=s.webhook_spool_minutes,
    ).start()
    log.info("webhooks go to %d URL(s)", len(s.webhook_urls))
    return current


async def stop(deliverer: Deliverer | None) -> None:
    global current
    if deliverer is not None:
        await deliverer.stop()
    if current is deliverer:
        current = None


def poke() -> None:
    """Events were just written: send them now rather than at the next poll."""
    if current is not None:
        current.poke()


async def depth(services) -> dict[str, int]:
    """Deliveries waiting (not delivered, not given up): in the database and the local queue."""
    found = {}
    if services.db is not None:
        found["database"] = await services.db.pool.fetchval(
            "select count(*) from public.webhook_deliveries"
            " where delivered_at is null and failed_at is null",
            timeout=1.0,
        )
    found["local"] = len(await asyncio.to_thread(queue_for(services.settings).pending))
    return found
