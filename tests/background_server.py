"""Run an aiohttp app on 127.0.0.1 in a background thread, for the test stand-ins."""

from __future__ import annotations

import asyncio
import threading

from aiohttp import web


class BackgroundServer:
    """Subclasses fill in `build_app()`; `url(mode)` addresses one of its behaviours."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self.port = 0

    def build_app(self) -> web.Application:
        raise NotImplementedError

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        # A stand-in stops at once: a connection a test left open (a keep-alive, a stream
        # cut mid-answer) gets half a second, not aiohttp's 60 s (which stop() cut at 10).
        runner = web.AppRunner(self.build_app(), shutdown_timeout=0.5)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    def start(self):
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def url(self, mode: str) -> str:
        return f"http://127.0.0.1:{self.port}/{mode}"
