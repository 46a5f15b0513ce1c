"""The /admin routes: the page and its JSON API on Chainlit's FastAPI app.

No `from __future__ import annotations` here: FastAPI must see the route annotations as
objects, and `Admin` is local to build_router.
"""

import asyncio
import gzip
import json
import logging
import uuid
import zlib
from collections.abc import Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated

import asyncpg
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.datastructures import MutableHeaders

from vtai.admin import balances, reconcile
from vtai.admin import plans as plans_panel
from vtai.admin.auth import NotSignedIn, admin_from_request, same_origin
from vtai.admin.export import csv_rows
from vtai.admin.reports import (
    FIRST_YEAR,
    LAST_YEAR,
    PAGE_SIZE,
    STATUSES,
    LogFilter,
    TierError,
    decode_cursor,
    feedback,
    log_page,
    models,
    series,
    set_tier,
    summary,
    user_table,
)
from vtai.api import account, keys
from vtai.notify import report as notify_report

log = logging.getLogger(__name__)


PAGE = Path(__file__).resolve().parents[2] / "public" / "admin" / "index.html"


def _plain(value):
    # What FastAPI's jsonable_encoder makes of the types the reports hold.
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return int(value) if value.as_tuple().exponent >= 0 else float(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, asyncpg.Record):
        return dict(value)
    return jsonable_encoder(value)


# Starlette's GZipMiddleware (Chainlit adds it) compresses at level 9: 13 MB/s here, over a
# millisecond for a 17 kB log page and 12 s for a 160 MB CSV. Level 1 packs these nearly as
# tight (a ratio of 2.6 against 2.9 on the CSV) at 80 MB/s; a response that says its own
# Content-Encoding is passed through by the middleware.
GZIP_LEVEL = 1
GZIP_MIN = 1000


def accepts_gzip(scope) -> bool:
    return any(k == b"accept-encoding" and b"gzip" in v for k, v in scope["headers"])


def _gzip_headers(headers: MutableHeaders, length: int | None = None) -> None:
    headers["content-encoding"] = "gzip"
    headers.add_vary_header("Accept-Encoding")
    if length is not None:
        headers["content-length"] = str(length)


class JSONBytes(Response):
    """Bytes already JSON, gzipped at GZIP_LEVEL when the client takes gzip."""

    media_type = "application/json"

    async def __call__(self, scope, receive, send) -> None:
        if len(self.body) >= GZIP_MIN and accepts_gzip(scope):
            self.body = gzip.compress(self.body, GZIP_LEVEL)
            _gzip_headers(MutableHeaders(raw=self.raw_headers), len(self.body))
        await super().__call__(scope, receive, send)


def _json(content) -> Response:
    """`content` as the JSON FastAPI would send, by the C encoder: jsonable_encoder walks every
    value in Python first, which cost most of a log page's time in the app."""
    body = json.dumps(
        content, default=_plain, ensure_ascii=False, allow_nan=False, separators=(",", ":")
    )
    return JSONBytes(body.encode())


async def _gzipped(chunks):
    """`chunks` gzipped at GZIP_LEVEL, each compressed in a worker thread (zlib lets go of the
    GIL) while the event loop fetches and writes the next."""
    z = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
    try:
        async for chunk in chunks:
            out = await asyncio.to_thread(z.compress, chunk.encode())
            if out:
                yield out
        yield z.flush()
    finally:
        await chunks.aclose()  # a download cancelled midway stops the export's fetches too


def _date(value: str | None, name: str) -> date | None:
    if not value:
        return None
    try:
        parsed = date.fromisoformat(value)
    except ValueError:
        raise HTTPException(400, f"{name}: expected a date like 2026-11-22") from None
    if not FIRST_YEAR <= parsed.year <= LAST_YEAR:
        raise HTTPException(400, f"{name}: a date from {FIRST_YEAR} to {LAST_YEAR}")
    return parsed


def _filter(request: Request) -> LogFilter:
    q = request.query_params
    user = q.get("user") or None
    try:
        user_id = uuid.UUID(user) if user else None
    except ValueError:
        raise HTTPException(400, "user: expected a user id") from None
    status = q.get("status") or None
    if status and status not in STATUSES:
        raise HTTPException(400, f"status: one of {', '.join(STATUSES)}")
    start, end = _date(q.get("from"), "from"), _date(q.get("to"), "to")
    if start and end and start > end:
        raise HTTPException(400, "from: on or before to")
    return LogFilter(user_id, q.get("model") or None, status, start, end)


def _cursor(request: Request) -> str | None:
    cursor = request.query_params.get("cursor") or None
    if cursor:
        try:
            decode_cursor(cursor)
        except ValueError:
            raise HTTPException(400, "cursor: pass back a next_cursor unchanged") from None
    return cursor


def _services_pool() -> asyncpg.Pool:
    from vtai.settings import NEEDS_DATABASE
    from vtai.ui import chat

    db = chat.services().db
    if db is None:
        raise HTTPException(503, f"The admin dashboard {NEEDS_DATABASE}")
    return db.pool


def _services_period() -> str:
    from vtai.ui import chat

    return chat.services().settings.usage_period


def _services_limits() -> dict[str, int]:
    """The VTAI_LIMIT_* variables set (a tier's token limit put back at every start-up)."""
    from vtai.ui import chat

    try:
        return chat.services().settings.tier_limits
    except RuntimeError:  # no services (the routes on an app of their own)
        return {}


async def _body(request: Request):
    try:
        return await request.json()
    except (ValueError, RecursionError):
        return None


def build_router(
    get_pool: Callable[[], asyncpg.Pool] = _services_pool,
    get_period: Callable[[], str] = _services_period,
    get_limits: Callable[[], dict[str, int]] = _services_limits,
) -> APIRouter:
    # Every route: a GET passes, anything that changes state must come from our own origin.
    router = APIRouter(dependencies=[Depends(same_origin)])
    # /account (any signed-in user's API keys) rides on this router, so that registering the
    # admin routes registers it too; its own 503 names the account page.
    router.include_router(
        account.build_router(None if get_pool is _services_pool else get_pool, get_period)
    )

    async def require_admin(request: Request) -> asyncpg.Record:
        try:
            return await admin_from_request(request, get_pool())
        except NotSignedIn:
            raise HTTPException(401, "sign in first") from None

    Admin = Annotated[asyncpg.Record, Depends(require_admin)]

    @router.get("/admin", include_in_schema=False)
    @router.get("/admin/", include_in_schema=False)
    async def page(request: Request):
        try:
            await admin_from_request(request, get_pool())
        except NotSignedIn:
            return RedirectResponse("/login", status_code=303)
        except HTTPException as exc:
            return HTMLResponse(
                f"<p>{exc.detail}. <a href='/'>Back to the chat</a></p>",
                status_code=exc.status_code,
            )
        return FileResponse(PAGE, headers={"Cache-Control": "no-store"})

    @router.get("/admin/api/summary")
    async def api_summary(admin: Admin):
        return _json(await summary(get_pool(), get_period()))

    @router.get("/admin/api/series")
    async def api_series(admin: Admin, days: int = 30):
        if not 1 <= days <= 366:
            raise HTTPException(400, "days: 1 to 366")
        return _json(await series(get_pool(), days))

    @router.get("/admin/api/users")
    async def api_users(
        admin: Admin, after: str | None = None, limit: int | None = None, q: str | None = None
    ):
        # Paged with `limit` (and `after`, the last name of the previous page); `q`: names
        # starting with it. The page asks for 100 at a time; without `limit`, every user.
        if limit is not None and not 1 <= limit <= 1000:
            raise HTTPException(400, "limit: 1 to 1000")
        if q is not None and len(q) > 64:
            raise HTTPException(400, "q: at most 64 characters")
        pool = get_pool()
        table = await user_table(pool, get_period(), after=after, limit=limit, q=q or None)
        table["models"] = await models(pool)
        return _json(table)

    @router.post("/admin/api/users/{user_id}/tier")
    async def api_set_tier(user_id: uuid.UUID, request: Request, admin: Admin):
        try:
            body = await request.json()
        except (ValueError, RecursionError):
            body = None
        tier = body.get("tier") if isinstance(body, dict) else None
        if not isinstance(tier, str) or not tier:
            raise HTTPException(400, 'send {"tier": "<name>"}')
        try:
            changed = await set_tier(get_pool(), user_id, tier, admin["username"])
        except TierError as exc:
            raise HTTPException(400, str(exc)) from None
        except LookupError as exc:
            raise HTTPException(404, str(exc)) from None
        log.info("admin %s set %s's tier to %s", admin["username"], changed["username"], tier)
        return changed

    @router.get("/admin/api/logs")
    async def api_logs(request: Request, admin: Admin):
        f = _filter(request)
        cursor = _cursor(request)
        try:
            limit = min(max(int(request.query_params.get("limit") or PAGE_SIZE), 1), 500)
        except ValueError:
            raise HTTPException(400, "limit: a number from 1 to 500") from None
        return _json(await log_page(get_pool(), f, cursor, limit))

    @router.get("/admin/api/logs.csv")
    async def api_logs_csv(request: Request, admin: Admin):
        f = _filter(request)
        name = f"request_logs_{datetime.now(UTC):%Y%m%d_%H%M%S}.csv"
        chunks = csv_rows(get_pool(), f)
        response = StreamingResponse(
            _gzipped(chunks) if accepts_gzip(request.scope) else chunks,
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )
        if accepts_gzip(request.scope):
            _gzip_headers(response.headers)
        return response

    @router.get("/admin/api/feedback")
    async def api_feedback(admin: Admin):
        return _json(await feedback(get_pool()))

    @router.get("/admin/api/balances")
    async def api_balances(admin: Admin):
        return _json(await balances.read(get_pool()))

    @router.post("/admin/api/balances/sync")
    async def api_balances_sync(admin: Admin):
        return await balances.sync(get_pool())

    @router.get("/admin/api/reconciliation")
    async def api_reconciliation(admin: Admin, days: int = reconcile.REPORT_DAYS):
        if not 1 <= days <= 366:
            raise HTTPException(400, "days: 1 to 366")
        return await reconcile.report(get_pool(), days)

    # --- Operator webhooks: deliveries by URL, failures, retry (vtai.notify) ---------------

    @router.get("/admin/api/webhooks")
    async def api_webhooks(admin: Admin):
        return await notify_report.admin(get_pool())

    @router.post("/admin/api/webhooks/retry")
    async def api_webhooks_retry(admin: Admin):
        return {"retried": await notify_report.retry(get_pool())}

    # --- API keys: every user's, with revoke (vtai.api.keys) -------------------------------

    @router.get("/admin/api/keys")
    async def api_keys(admin: Admin):
        async with get_pool().acquire() as conn:
            found = await keys.list_keys(conn)
            used = await keys.usage(conn, [k.id for k in found], get_period())
        return _json({"keys": [k.as_dict() | {"tokens": used.get(k.id, 0)} for k in found]})

    @router.post("/admin/api/keys/{key_id}/revoke")
    async def api_revoke_key(key_id: str, admin: Admin):
        try:
            target = uuid.UUID(key_id)
        except ValueError:
            raise HTTPException(400, "key: not a key id") from None
        try:
            async with get_pool().acquire() as conn:
                key, changed = await keys.revoke(conn, target, actor=admin["username"])
        except keys.KeyNotFound as exc:
            raise HTTPException(404, str(exc)) from None
        return {"key": key.as_dict(), "changed": changed}

    # --- Plans: each edit validated, then saved with its audit row (vtai.admin.plans) -------

    async def edit(work, what: str, admin):
        try:
            result = await work
        except plans_panel.FormError as exc:
            raise HTTPException(400, str(exc)) from None
        log.info("admin %s changed %s", admin["username"], what)
        return result

    @router.get("/admin/api/plans")
    async def api_plans(admin: Admin):
        return _json(await plans_panel.panel(get_pool(), get_limits()))

    @router.post("/admin/api/plans/{tier}")
    async def api_save_plan(tier: str, request: Request, admin: Admin):
        body = await _body(request)
        work = plans_panel.save_plan(get_pool(), tier, body, admin["username"], get_limits())
        return await edit(work, f"the {tier} plan", admin)

    @router.post("/admin/api/models")
    async def api_add_model(request: Request, admin: Admin):
        work = plans_panel.add_model(get_pool(), await _body(request), admin["username"])
        return await edit(work, "the model catalogue", admin)

    @router.post("/admin/api/models/enabled")
    async def api_model_enabled(request: Request, admin: Admin):
        work = plans_panel.set_enabled(get_pool(), await _body(request), admin["username"])
        return await edit(work, "a model's state", admin)

    @router.post("/admin/api/weights")
    async def api_weight(request: Request, admin: Admin):
        work = plans_panel.set_weight(get_pool(), await _body(request), admin["username"])
        return await edit(work, "a model weight", admin)

    return router


def register(
    app: FastAPI,
    get_pool: Callable[[], asyncpg.Pool] = _services_pool,
    get_period: Callable[[], str] = _services_period,
    get_limits: Callable[[], dict[str, int]] = _services_limits,
) -> None:
    """Add the admin routes to `app`, ahead of Chainlit's catch-all `/{full_path:path}`.

    Calling it again (Chainlit's --watch re-imports main.py) replaces the routes.
    """
    app.router.routes[:] = [r for r in app.router.routes if not getattr(r, "vtai_admin", False)]
    before = len(app.router.routes)
    app.include_router(build_router(get_pool, get_period, get_limits))
    added = app.router.routes[before:]
    for route in added:
        route.vtai_admin = True
    del app.router.routes[before:]
    app.router.routes[0:0] = added
