"""A real local HTTP receiver of VT.ai's webhooks (aiohttp on a free port), for tests: it keeps
every delivery and counts how many of each event id are being handled at once.

Paths: /ok answers 204; /hang-once holds the first delivery of each event id open until its
sender goes away (a sender that dies mid-send), and answers 204 to the rest; /fail answers 500.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass

from aiohttp import web

from tests.background_server import BackgroundServer


@dataclass
class Delivery:
    path: str
    headers: dict
    body: bytes
    at: float

    @property
    def event(self) -> dict:
        return json.loads(self.body)


class Receiver(BackgroundServer):
    def __init__(self) -> None:
        super().__init__()
        self.deliveries: list[Delivery] = []
        self.in_flight: dict[str, int] = {}
        self.most_at_once = 0
        self._seen_hang: set[str] = set()
        self._hanging: set[asyncio.Future] = set()
        self._lock = threading.Condition()

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{mode}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        mode = request.match_info["mode"]
        event_id = request.headers.get("VTAI-Event-Id", "")
        with self._lock:
            self.deliveries.append(Delivery(mode, dict(request.headers), body, time.time()))
            self.in_flight[event_id] = self.in_flight.get(event_id, 0) + 1
            self.most_at_once = max(self.most_at_once, self.in_flight[event_id])
            hang = mode == "hang-once" and event_id not in self._seen_hang
            self._seen_hang.add(event_id)
            self._lock.notify_all()
        try:
            if hang:
                held = asyncio.get_running_loop().create_future()
                self._hanging.add(held)
                await held  # until stop(): aiohttp goes on with a handler whose client left
            # Long enough that two senders of one event would overlap here.
            await asyncio.sleep(0.01)
            return web.Response(status=500 if mode == "fail" else 204)
        finally:
            with self._lock:
                self.in_flight[event_id] -= 1

    def stop(self) -> None:
        for held in list(self._hanging):
            self._loop.call_soon_threadsafe(held.cancel)
        super().stop()

    def of(self, path: str | None = None, type_: str | None = None) -> list[Delivery]:
        with self._lock:
            found = list(self.deliveries)
        return [
            d
            for d in found
            if (path is None or d.path == path) and (type_ is None or d.event["type"] == type_)
        ]

    async def wait_for(self, check, timeout: float = 30.0):
        """Waits, without polling, until `check()` (over the deliveries) is truthy."""

        def wait():
            with self._lock:
                found = self._lock.wait_for(check, timeout)
            assert found, f"no such delivery in {timeout} s"
            return found

        return await asyncio.to_thread(wait)
