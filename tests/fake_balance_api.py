"""A FAKE OpenRouter credits endpoint on 127.0.0.1, for tests only.

It stands in for https://openrouter.ai/api/v1/credits, which can't be reached from here. Point
VTAI_OPENROUTER_BASE at `url(mode)`; the mode picks the answer: ok (credits 25.5, usage 5.25),
500, 401, hang (never answers), garbage (200 with a body that isn't the credits shape).
The Authorization headers it received are kept in `auth_headers`.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from tests.background_server import BackgroundServer

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


class FakeBalanceApi(BackgroundServer):
    def __init__(self) -> None:
        super().__init__()
        self.auth_headers: list[str | None] = []

    def build_app(self) -> web.Application:
        app = web.Application()
        app[AUTH] = self.auth_headers
        app.router.add_get("/{mode}/api/v1/credits", _credits)
        return app
