"""The operator dashboard at /admin: a static page (public/admin/) and its JSON API.

Routes live on Chainlit's own FastAPI app, so they share its login: the `access_token`
cookie is decoded with Chainlit's decode_jwt, and `profiles.is_admin` is read from the
database on every request, because the JWT's metadata is a copy made at login and can be
stale. Charts and cards read `usage_aggregates`; only the log browser reads `request_logs`,
one keyset page at a time.

No `from __future__ import annotations` here: FastAPI must see the route annotations as
objects, and `Admin` is local to build_router.
"""

import csv
import io
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Annotated

import asyncpg
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, StreamingResponse

from vtai import balances, web_security

log = logging.getLogger(__name__)

PAGE = Path(__file__).resolve().parent.parent / "public" / "admin" / "index.html"
STATUSES = ("success", "failure", "refused")
NIL_USER = uuid.UUID(int=0)
PAGE_SIZE = 50
CSV_BATCH = 1000
# Dates and cursors the log browser accepts; anything outside is a 400, not a database error.
FIRST_YEAR, LAST_YEAR = 2000, 2100
MAX_ROW_ID = 2**63 - 1
CSV_COLUMNS = (
    "id",
    "created_at",
    "username",
    "end_user",
    "model",
    "provider",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "total_cost",
    "response_time",
    "error",
)


class NotSignedIn(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Who is asking


async def admin_from_request(request: Request, pool: asyncpg.Pool) -> asyncpg.Record:
    """The admin's profile row; NotSignedIn without a valid session, 403 for anyone else."""
    from chainlit.auth import get_token_from_cookies
    from chainlit.auth.jwt import decode_jwt

    token = get_token_from_cookies(request.cookies)
    if not token:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        token = value.strip() if scheme.lower() == "bearer" else None
    if not token:
        raise NotSignedIn
    try:
        user = decode_jwt(token)
    except Exception:
        raise NotSignedIn from None
    user_id = (user.metadata or {}).get("id")
    try:
        key = uuid.UUID(str(user_id)) if user_id else None
    except ValueError:
        key = None
    if key is not None:
        row = await pool.fetchrow(
            "select id, username, is_admin from public.profiles where id = $1", key
        )
    else:
        row = await pool.fetchrow(
            "select id, username, is_admin from public.profiles where username = $1",
            user.identifier,
        )
    if row is None or not row["is_admin"]:
        raise HTTPException(status_code=403, detail="administrators only")
    return row


# ---------------------------------------------------------------------------------------------
# Cards and charts: usage_aggregates only


async def feedback(pool: asyncpg.Pool, limit: int = 50) -> list[dict]:
    """The newest thumbs up/down on answers, with who gave them and on which chat."""
    rows = await pool.fetch(
        'select f."createdAt" as at, f.value, f.comment, u.identifier as username,'
        " t.id as thread_id, t.name as thread, left(s.output, 200) as answer"
        ' from public."Feedback" f'
        ' join public."Step" s on s.id = f."stepId"'
        ' join public."Thread" t on t.id = s."threadId"'
        ' left join public."User" u on u.id = t."userId"'
        ' order by f."createdAt" desc limit $1',
        limit,
    )
    return [
        {**dict(r), "at": r["at"].isoformat(), "value": "up" if r["value"] > 0 else "down"}
        for r in rows
    ]


def _day(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


async def summary(pool: asyncpg.Pool, period: str, now: datetime | None = None) -> dict:
    now = now or datetime.now(UTC)
    today = _day(now)
    period_start = await pool.fetchval("select public.vtai_period_start($1, $2)", period, now)
    totals = await pool.fetchrow(
        """
        select
          coalesce(sum(requests) filter (where bucket_start >= $1), 0)::bigint as today_requests,
          coalesce(sum(total_tokens) filter (where bucket_start >= $1), 0)::bigint
            as today_tokens,
          coalesce(sum(cost) filter (where bucket_start >= $1), 0) as today_cost,
          count(distinct end_user) filter (where bucket_start >= $1 and end_user <> $3)
            as today_users,
          coalesce(sum(requests) filter (where bucket_start >= $2), 0)::bigint
            as period_requests,
          coalesce(sum(total_tokens) filter (where bucket_start >= $2), 0)::bigint
            as period_tokens,
          coalesce(sum(cost) filter (where bucket_start >= $2), 0) as period_cost,
          count(distinct end_user) filter (where bucket_start >= $2 and end_user <> $3)
            as period_users
        from public.usage_aggregates
        where granularity = 'day' and bucket_start >= least($1, $2)
        """,
        today,
        period_start,
        NIL_USER,
    )
    at_limit = await pool.fetchval(
        """
        select count(*) from public.profiles p
        join public.tiers t on t.name = p.tier
        join public.usage_counters c on c.end_user = p.id and c.period_start = $1
        where t.token_limit is not null and c.used >= t.token_limit
        """,
        period_start,
    )
    t = dict(totals)
    return {
        "period": period,
        "period_start": period_start,
        "today": {k[6:]: t[k] for k in t if k.startswith("today_")},
        "this_period": {k[7:]: t[k] for k in t if k.startswith("period_")},
        "users_at_limit": at_limit,
        "balances": await balances.read(pool),
    }


async def series(pool: asyncpg.Pool, days: int, now: datetime | None = None) -> dict:
    """Zero-filled buckets for the last `days` days: hourly for one day, daily beyond."""
    now = now or datetime.now(UTC)
    granularity = "hour" if days <= 1 else "day"
    step = timedelta(hours=1) if granularity == "hour" else timedelta(days=1)
    end = _day(now) + timedelta(days=1)
    start = end - timedelta(days=days)
    points = await pool.fetch(
        """
        select s.bucket as bucket,
               coalesce(sum(a.requests), 0)::bigint as requests,
               coalesce(sum(a.failures), 0)::bigint as failures,
               coalesce(sum(a.refusals), 0)::bigint as refusals,
               coalesce(sum(a.prompt_tokens), 0)::bigint as prompt_tokens,
               coalesce(sum(a.completion_tokens), 0)::bigint as completion_tokens,
               coalesce(sum(a.cost), 0) as cost
        from generate_series($2::timestamptz, $3::timestamptz - $4::interval, $4::interval)
             as s (bucket)
        left join public.usage_aggregates a
          on a.granularity = $1 and a.bucket_start = s.bucket
        group by s.bucket order by s.bucket
        """,
        granularity,
        start,
        end,
        step,
    )
    by_model = await pool.fetch(
        """
        select model, sum(requests)::bigint as requests, sum(total_tokens)::bigint as tokens,
               sum(cost) as cost
        from public.usage_aggregates
        where granularity = 'day' and bucket_start >= $1 and bucket_start < $2
        group by model order by sum(cost) desc, model
        """,
        start,
        end,
    )
    return {
        "granularity": granularity,
        "start": start,
        "end": end,
        "points": [dict(r) for r in points],
        "by_model": [dict(r) for r in by_model],
    }


async def models(pool: asyncpg.Pool) -> list[str]:
    rows = await pool.fetch(
        "select distinct model from public.usage_aggregates where granularity = 'day'"
        " order by model"
    )
    return [r["model"] for r in rows]


# ---------------------------------------------------------------------------------------------
# Users and tiers


async def user_table(pool: asyncpg.Pool, period: str, now: datetime | None = None) -> dict:
    now = now or datetime.now(UTC)
    rows = await pool.fetch(
        """
        select p.id, p.username, p.tier, p.is_admin, t.token_limit as limit,
               coalesce(c.used, 0) as used,
               case when t.token_limit is null then null
                    else greatest(t.token_limit - coalesce(c.used, 0), 0) end as remaining,
               last.bucket_start as last_active
        from public.profiles p
        join public.tiers t on t.name = p.tier
        left join public.usage_counters c
          on c.end_user = p.id and c.period_start = public.vtai_period_start($1, $2)
        -- the newest hour bucket: one index probe per user, never a scan of the ledger
        left join lateral (
          select a.bucket_start from public.usage_aggregates a
          where a.end_user = p.id and a.granularity = 'hour'
          order by a.bucket_start desc limit 1
        ) last on true
        order by p.username
        """,
        period,
        now,
    )
    tiers = await pool.fetch("select name, token_limit from public.tiers order by rank, name")
    return {"users": [dict(r) for r in rows], "tiers": [dict(r) for r in tiers]}


class TierError(ValueError):
    pass


async def set_tier(pool: asyncpg.Pool, user_id: uuid.UUID, tier: str) -> dict:
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval(
            "select exists(select 1 from public.tiers where name = $1)", tier
        ):
            names = [r["name"] for r in await conn.fetch("select name from public.tiers")]
            raise TierError(f"unknown tier {tier!r}: choose one of {', '.join(sorted(names))}")
        row = await conn.fetchrow(
            "update public.profiles set tier = $2 where id = $1 returning id, username, tier",
            user_id,
            tier,
        )
    if row is None:
        raise LookupError(f"no user with id {user_id}")
    return dict(row)


# ---------------------------------------------------------------------------------------------
# The log browser: keyset pages of request_logs


@dataclass(frozen=True)
class LogFilter:
    user: uuid.UUID | None = None
    model: str | None = None
    status: str | None = None
    start: date | None = None
    # inclusive: rows up to the end of this UTC day
    end: date | None = None


def _utc_midnight(d: date) -> datetime:
    return datetime(d.year, d.month, d.day, tzinfo=UTC)


def encode_cursor(created_at: datetime, row_id: int) -> str:
    return f"{created_at.isoformat()}_{row_id}"


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    """The (created_at, id) a cursor names; ValueError for anything encode_cursor never makes."""
    at, _, row_id = cursor.rpartition("_")
    parsed = datetime.fromisoformat(at)
    if parsed.tzinfo is None:
        raise ValueError("cursor has no time zone")
    if not FIRST_YEAR <= parsed.year <= LAST_YEAR:
        raise ValueError("cursor is out of range")
    key = int(row_id)
    if not 0 < key <= MAX_ROW_ID:
        raise ValueError("cursor is out of range")
    return parsed, key


async def log_page(
    pool: asyncpg.Pool, f: LogFilter, cursor: str | None = None, limit: int = PAGE_SIZE
) -> dict:
    """Up to `limit` rows older than `cursor`, newest first, and the cursor of the next page."""
    where: list[str] = []
    args: list = []

    def arg(value) -> str:
        args.append(value)
        return f"${len(args)}"

    if f.user is not None:
        where.append(f"r.end_user = {arg(f.user)}")
    if f.model:
        where.append(f"r.model = {arg(f.model)}")
    if f.status:
        where.append(f"r.status = {arg(f.status)}")
    if f.start:
        where.append(f"r.created_at >= {arg(_utc_midnight(f.start))}")
    if f.end:
        where.append(f"r.created_at < {arg(_utc_midnight(f.end) + timedelta(days=1))}")
    if cursor:
        at, row_id = decode_cursor(cursor)
        where.append(f"(r.created_at, r.id) < ({arg(at)}, {arg(row_id)})")
    rows = await pool.fetch(
        f"""
        select r.id, r.created_at, p.username, r.end_user, r.model, r.provider, r.status,
               r.prompt_tokens, r.completion_tokens, r.total_tokens,
               -- null: the model has no price in LiteLLM's map, so the cost is unknown
               case when r.additional_details @> '{{"cost_unknown": true}}' then null
                    else r.total_cost end as total_cost,
               r.response_time,
               coalesce((r.error ->> 'class') || ': ' || left(r.error ->> 'message', 200),
                        r.additional_details ->> 'reason') as error
        from public.request_logs r
        left join public.profiles p on p.id = r.end_user
        {"where " + " and ".join(where) if where else ""}
        order by r.created_at desc, r.id desc
        limit {arg(limit + 1)}
        """,
        *args,
    )
    more = len(rows) > limit
    rows = rows[:limit]
    last = rows[-1] if rows else None
    return {
        "rows": [dict(r) for r in rows],
        "next_cursor": encode_cursor(last["created_at"], last["id"]) if more else None,
    }


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    text = str(value)
    # A spreadsheet would run a cell starting with one of these as a formula.
    if isinstance(value, str) and text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + text
    return text


def _csv_cell(row: dict, column: str) -> str:
    if column == "total_cost" and row[column] is None:
        return "unknown"  # not in LiteLLM's price map: never shown as a cost of 0
    return _cell(row[column])


async def csv_rows(pool: asyncpg.Pool, f: LogFilter) -> AsyncIterator[str]:
    """The filtered rows as CSV text, a keyset batch at a time (no long-held transaction)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_COLUMNS)
    cursor = None
    while True:
        page = await log_page(pool, f, cursor, CSV_BATCH)
        for r in page["rows"]:
            writer.writerow([_csv_cell(r, c) for c in CSV_COLUMNS])
        yield buf.getvalue()
        buf.seek(0)
        buf.truncate()
        cursor = page["next_cursor"]
        if cursor is None:
            return


# ---------------------------------------------------------------------------------------------
# HTTP


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


def same_origin(request: Request) -> None:
    """403 for a state-changing request from a page on another origin (web_security's rule).

    The cookie is SameSite=lax, so a page on another port of the same host still sends it.
    """
    if request.method in web_security.SAFE_METHODS:
        return
    if not web_security.request_origin_allowed(request.headers):
        raise HTTPException(403, "cross-origin request refused")


def _services_pool() -> asyncpg.Pool:
    from vtai import chat
    from vtai.settings import NEEDS_DATABASE

    db = chat.services().db
    if db is None:
        raise HTTPException(503, f"The admin dashboard {NEEDS_DATABASE}")
    return db.pool


def _services_period() -> str:
    from vtai import chat

    return chat.services().settings.usage_period


def build_router(
    get_pool: Callable[[], asyncpg.Pool] = _services_pool,
    get_period: Callable[[], str] = _services_period,
) -> APIRouter:
    # Every route: a GET passes, anything that changes state must come from our own origin.
    router = APIRouter(dependencies=[Depends(same_origin)])

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
        return await summary(get_pool(), get_period())

    @router.get("/admin/api/series")
    async def api_series(admin: Admin, days: int = 30):
        if not 1 <= days <= 366:
            raise HTTPException(400, "days: 1 to 366")
        return await series(get_pool(), days)

    @router.get("/admin/api/users")
    async def api_users(admin: Admin):
        table = await user_table(get_pool(), get_period())
        table["models"] = await models(get_pool())
        return table

    @router.post("/admin/api/users/{user_id}/tier")
    async def api_set_tier(user_id: uuid.UUID, request: Request, admin: Admin):
        try:
            body = await request.json()
        except ValueError:
            body = None
        tier = body.get("tier") if isinstance(body, dict) else None
        if not isinstance(tier, str) or not tier:
            raise HTTPException(400, 'send {"tier": "<name>"}')
        try:
            changed = await set_tier(get_pool(), user_id, tier)
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
        return await log_page(get_pool(), f, cursor, limit)

    @router.get("/admin/api/logs.csv")
    async def api_logs_csv(request: Request, admin: Admin):
        f = _filter(request)
        name = f"request_logs_{datetime.now(UTC):%Y%m%d_%H%M%S}.csv"
        return StreamingResponse(
            csv_rows(get_pool(), f),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    @router.get("/admin/api/feedback")
    async def api_feedback(admin: Admin):
        return await feedback(get_pool())

    @router.get("/admin/api/balances")
    async def api_balances(admin: Admin):
        return await balances.read(get_pool())

    @router.post("/admin/api/balances/sync")
    async def api_balances_sync(admin: Admin):
        return await balances.sync(get_pool())

    return router


def register(
    app: FastAPI,
    get_pool: Callable[[], asyncpg.Pool] = _services_pool,
    get_period: Callable[[], str] = _services_period,
) -> None:
    """Add the admin routes to `app`, ahead of Chainlit's catch-all `/{full_path:path}`.

    Calling it again (Chainlit's --watch re-imports main.py) replaces the routes.
    """
    app.router.routes[:] = [r for r in app.router.routes if not getattr(r, "vtai_admin", False)]
    before = len(app.router.routes)
    app.include_router(build_router(get_pool, get_period))
    added = app.router.routes[before:]
    for route in added:
        route.vtai_admin = True
    del app.router.routes[before:]
    app.router.routes[0:0] = added
