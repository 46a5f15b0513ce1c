"""A FAKE OpenRouter credits endpoint on 127.0.0.1, for tests only.

It stands in for https://openrouter.ai/api/v1/credits, which can't be reached from here. Point
VTAI_OPENROUTER_BASE at `url(mode)`; the mode picks the answer: ok (credits 25.5, usage 5.25),
500, 401, hang (never answers), garbage (200 with a body that isn't the credits shape).
The Authorization headers it received are kept in `auth_headers`.
"""

from __future__ import annotations

import asyncio
import threading

from aiohttp import web

AUTH = web.AppKey("auth", list)
CREDITS = {"data": {"total_credits": 25.5, "total_usage": 5.25}}


async def _credits(request: web.Request) -> web.StreamResponse:
    mode = request.match_info["mode"]
    request.app[AUTH].append(request.headers.get("Authorization"))
    if mode == "ok":
        return web.json_response(CREDITS)
    if mode == "500":
        return web.json_response({"error": {"message": "internal error"}}, status=500)
    if mode == "401":
        # Echo the key the way a careless API might: it must never reach the database.
        key = request.headers.get("Authorization", "").removeprefix("Bearer ")
        return web.json_response({"error": {"message": f"invalid key {key}"}}, status=401)
    if mode == "hang":
        await asyncio.sleep(3600)
    return web.json_response({"unexpected": True})


class FakeBalanceApi:
    def __init__(self) -> None:
        self.auth_headers: list[str | None] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self.port = 0

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app[AUTH] = self.auth_headers
        app.router.add_get("/{mode}/api/v1/credits", _credits)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    def start(self) -> FakeBalanceApi:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def url(self, mode: str) -> str:
        return f"http://127.0.0.1:{self.port}/{mode}"
