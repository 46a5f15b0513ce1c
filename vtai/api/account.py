"""The /account page and its JSON API: a signed-in user's own API keys.

Any signed-in user (the chat's login, checked as /admin checks it: vtai.admin.auth, the profile
read on every request) lists their keys with each one's tokens this period, creates one (shown
once, in the answer that creates it, never again) and revokes one. Another user's key is 404,
as if it did not exist. State-changing requests from another origin are refused (403), and the
page runs no inline script, so the app's Content-Security-Policy holds.

An API key is no login here: only the chat's session cookie (or its JWT) is, so a key can't
make more keys. In Supabase REST-only mode the page is off with one line naming
SUPABASE_DB_URL, like /admin.

The routes ride on /admin's router (vtai.admin.routes includes them), so vtai/main.py's
`admin.register(app)` registers both.

No `from __future__ import annotations`: FastAPI must see the route annotations as objects.
"""

import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import asyncpg
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse

from vtai.admin.auth import NotSignedIn, same_origin, user_from_request
from vtai.api import keys

log = logging.getLogger(__name__)

PAGE = Path(__file__).resolve().parents[2] / "public" / "account" / "index.html"
NO_STORE = {"Cache-Control": "no-store"}


def _services_pool() -> asyncpg.Pool:
    from vtai.settings import NEEDS_DATABASE
    from vtai.ui import chat

    db = chat.services().db
    if db is None:
        raise HTTPException(503, f"The account page {NEEDS_DATABASE}")
    return db.pool


def _services_period() -> str:
    from vtai.ui import chat

    return chat.services().settings.usage_period


async def _body(request: Request):
    try:
        return await request.json()
    except (ValueError, RecursionError):
        return None


def _key_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise HTTPException(400, "key: not a key id") from None


def build_router(
    get_pool: Callable[[], asyncpg.Pool] | None = None,
    get_period: Callable[[], str] | None = None,
) -> APIRouter:
    get_pool = get_pool or _services_pool
    get_period = get_period or _services_period
    router = APIRouter(dependencies=[Depends(same_origin)])

    async def require_user(request: Request) -> asyncpg.Record:
        try:
            return await user_from_request(request, get_pool())
        except NotSignedIn:
            raise HTTPException(401, "sign in first") from None

    User = Annotated[asyncpg.Record, Depends(require_user)]

    @router.get("/account", include_in_schema=False)
    @router.get("/account/", include_in_schema=False)
    async def page(request: Request):
        try:
            await user_from_request(request, get_pool())
        except NotSignedIn:
            return RedirectResponse("/login", status_code=303)
        except HTTPException as exc:
            return HTMLResponse(
                f"<p>{exc.detail}. <a href='/'>Back to the chat</a></p>",
                status_code=exc.status_code,
            )
        return FileResponse(PAGE, headers=NO_STORE)

    @router.get("/account/api/keys")
    async def api_keys(user: User):
        period = get_period()
        async with get_pool().acquire() as conn:
            own = await keys.list_keys(conn, user["id"])
            used = await keys.usage(conn, [k.id for k in own], period)
            period_start = await conn.fetchval("select public.vtai_period_start($1, now())", period)
        return JSONResponse(
            {
                "username": user["username"],
                "period": period,
                "period_start": period_start.isoformat() if period_start else None,
                "max_expires_days": keys.MAX_EXPIRES_DAYS,
                "keys": [k.as_dict() | {"tokens": used.get(k.id, 0)} for k in own],
            },
            headers=NO_STORE,
        )

    @router.post("/account/api/keys")
    async def api_create(request: Request, user: User):
        body = await _body(request)
        if not isinstance(body, dict):
            raise HTTPException(400, 'label: send {"label": "<name>", "expires_days": <n or null>}')
        try:
            expires_at = keys.expiry_in_days(body.get("expires_days"))
            async with get_pool().acquire() as conn:
                key, plain = await keys.create(
                    conn, user["id"], body.get("label"), expires_at, actor=user["username"]
                )
        except keys.ApiKeyError as exc:
            raise HTTPException(400, str(exc)) from None
        return JSONResponse(
            {"key": key.as_dict() | {"tokens": 0}, "secret": plain, "notice": keys.SHOWN_ONCE},
            status_code=201,
            headers=NO_STORE,
        )

    @router.post("/account/api/keys/{key_id}/revoke")
    async def api_revoke(key_id: str, user: User):
        try:
            async with get_pool().acquire() as conn:
                key, changed = await keys.revoke(
                    conn, _key_id(key_id), user["id"], actor=user["username"]
                )
        except keys.KeyNotFound as exc:
            raise HTTPException(404, str(exc)) from None
        return {"key": key.as_dict(), "changed": changed}

    return router
