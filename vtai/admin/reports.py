"""What /admin shows: cards and charts from `usage_aggregates`, the users table, tier
changes, and the request log one keyset page at a time.
"""

import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import asyncpg

from vtai.admin import balances
from vtai.plans import audit

# Dates and cursors the log browser accepts; anything outside is a 400, not a database error.
FIRST_YEAR, LAST_YEAR = 2000, 2100
STATUSES = ("success", "failure", "refused")


NIL_USER = uuid.UUID(int=0)


PAGE_SIZE = 50


MAX_ROW_ID = 2**63 - 1


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
    # Totals over everyone: the calendar month when each subscriber has a period of their own.
    calendar = "month" if period == "billing" else period
    period_start = await pool.fetchval("select public.vtai_period_start($1, $2)", calendar, now)
    # Closed days come from usage_rollups (one row per day and model), today from the live
    # buckets: never a sum over every user's buckets of the period.
    since = min(today, period_start)
    await pool.execute("select public.vtai_usage_rollups_fill($1, $2)", since, today)
    totals = await pool.fetchrow(
        """
        with days as (
          select bucket_start, requests, total_tokens, cost from public.usage_rollups
          where bucket_start >= $4::timestamptz and bucket_start < $1::timestamptz
          union all
          select bucket_start, requests, total_tokens, cost from public.usage_aggregates
          where granularity = 'day' and bucket_start >= $1::timestamptz
        )
        select
          coalesce(sum(requests) filter (where bucket_start >= $1), 0)::bigint as today_requests,
          coalesce(sum(total_tokens) filter (where bucket_start >= $1), 0)::bigint
            as today_tokens,
          coalesce(sum(cost) filter (where bucket_start >= $1), 0) as today_cost,
          (select count(distinct end_user) from public.usage_aggregates
           where granularity = 'day' and bucket_start >= $1 and end_user <> $3) as today_users,
          coalesce(sum(requests) filter (where bucket_start >= $2), 0)::bigint
            as period_requests,
          coalesce(sum(total_tokens) filter (where bucket_start >= $2), 0)::bigint
            as period_tokens,
          coalesce(sum(cost) filter (where bucket_start >= $2), 0) as period_cost,
          -- distinct users can't be summed per day: an index-only count over the period
          (select count(distinct end_user) from public.usage_aggregates
           where granularity = 'day' and bucket_start >= $2 and end_user <> $3) as period_users
        from days
        """,
        today,
        period_start,
        NIL_USER,
        since,
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
    if granularity == "hour":
        buckets = """
          select bucket_start, model, requests, failures, refusals, prompt_tokens,
                 completion_tokens, total_tokens, cost
          from public.usage_aggregates
          where granularity = 'hour' and bucket_start >= $1 and bucket_start < $2"""
    else:
        # Closed days from usage_rollups (built here the first time a day is asked for),
        # today from the live buckets.
        await pool.execute("select public.vtai_usage_rollups_fill($1, $2)", start, end)
        buckets = """
          select bucket_start, model, requests, failures, refusals, prompt_tokens,
                 completion_tokens, total_tokens, cost
          from public.usage_rollups
          where bucket_start >= $1::timestamptz and bucket_start < least($2::timestamptz, $3)
            and not (model = '' and requests = 0)
          union all
          select bucket_start, model, requests, failures, refusals, prompt_tokens,
                 completion_tokens, total_tokens, cost
          from public.usage_aggregates
          where granularity = 'day' and bucket_start >= greatest($1, $3) and bucket_start < $2"""
    args = (start, end) if granularity == "hour" else (start, end, _day(datetime.now(UTC)))
    sums = await pool.fetch(
        f"""
        select bucket_start, model, sum(requests)::bigint as requests,
               sum(failures)::bigint as failures, sum(refusals)::bigint as refusals,
               sum(prompt_tokens)::bigint as prompt_tokens,
               sum(completion_tokens)::bigint as completion_tokens,
               sum(total_tokens)::bigint as tokens, sum(cost) as cost
        from ({buckets}) b
        group by bucket_start, model
        """,
        *args,
    )
    zero = {"requests": 0, "failures": 0, "refusals": 0, "prompt_tokens": 0}
    zero |= {"completion_tokens": 0, "cost": 0}
    per_bucket: dict[datetime, dict] = {}
    per_model: dict[str, dict] = {}
    for r in sums:
        p = per_bucket.setdefault(r["bucket_start"], dict(zero))
        for k in zero:
            p[k] += r[k]
        m = per_model.setdefault(r["model"], {"requests": 0, "tokens": 0, "cost": 0})
        m["requests"] += r["requests"]
        m["tokens"] += r["tokens"]
        m["cost"] += r["cost"]
    points = []
    at = start
    while at < end:
        points.append({"bucket": at, **per_bucket.get(at, zero)})
        at += step
    by_model = sorted(
        ({"model": k, **v} for k, v in per_model.items()), key=lambda m: (-m["cost"], m["model"])
    )
    return {
        "granularity": granularity,
        "start": start,
        "end": end,
        "points": points,
        "by_model": by_model,
    }


# How far back the log filter's model list looks (the rollups of those days, built once).
MODELS_DAYS = 366


async def models(pool: asyncpg.Pool) -> list[str]:
    """The models with traffic in the last MODELS_DAYS days: from the daily rollups and
    today's buckets, not a scan of every user's buckets."""
    end = _day(datetime.now(UTC))
    start = end - timedelta(days=MODELS_DAYS)
    await pool.execute("select public.vtai_usage_rollups_fill($1, $2)", start, end)
    rows = await pool.fetch(
        "select model from public.usage_rollups where bucket_start >= $1 and requests > 0"
        " union select model from public.usage_aggregates"
        " where granularity = 'day' and bucket_start >= $2"
        " order by model",
        start,
        end,
    )
    return [r["model"] for r in rows]


async def user_table(
    pool: asyncpg.Pool,
    period: str,
    now: datetime | None = None,
    after: str | None = None,
    limit: int | None = None,
) -> dict:
    """Every user by name; or, with `limit`, one keyset page of them after the name `after`
    (each user costs an index probe for their last activity: 10^4 of them take ~0.3 s)."""
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
          on c.end_user = p.id and c.period_start = case
            -- a subscriber's own period; else a constant the planner folds once
            when $1 = 'billing' then
              (select up.period_start from public.vtai_user_period(p.id, $1, $2) up)
            else public.vtai_period_start($1, $2) end
        -- the newest hour bucket: one index probe per user, never a scan of the ledger
        left join lateral (
          select a.bucket_start from public.usage_aggregates a
          where a.end_user = p.id and a.granularity = 'hour'
          order by a.bucket_start desc limit 1
        ) last on true
        where $3::text is null or p.username > $3::text
        order by p.username
        limit $4
        """,
        period,
        now,
        after,
        limit,
    )
    tiers = await pool.fetch("select name, token_limit from public.tiers order by rank, name")
    return {"users": [dict(r) for r in rows], "tiers": [dict(r) for r in tiers]}


class TierError(ValueError):
    pass


async def set_tier(pool: asyncpg.Pool, user_id: uuid.UUID, tier: str, actor: str) -> dict:
    """Move a user to `tier`, with its audit row (`actor`: the admin) in the same transaction."""
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval(
            "select exists(select 1 from public.tiers where name = $1)", tier
        ):
            names = [r["name"] for r in await conn.fetch("select name from public.tiers")]
            raise TierError(f"unknown tier {tier!r}: choose one of {', '.join(sorted(names))}")
        was = await conn.fetchval(
            "select tier from public.profiles where id = $1 for update", user_id
        )
        row = await conn.fetchrow(
            "update public.profiles set tier = $2 where id = $1 returning id, username, tier",
            user_id,
            tier,
        )
        if row is not None and was != tier:
            await audit.record(
                conn, actor, audit.USER_TIER, row["username"], {"tier": was}, {"tier": tier}
            )
    if row is None:
        raise LookupError(f"no user with id {user_id}")
    return dict(row)


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


def log_query(f: LogFilter, cursor: str | None, limit: int) -> tuple[str, list]:
    """The keyset query for up to `limit` rows older than `cursor`, newest first."""
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
    sql = f"""
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
        """
    return sql, args


async def log_page(
    pool: asyncpg.Pool, f: LogFilter, cursor: str | None = None, limit: int = PAGE_SIZE
) -> dict:
    """Up to `limit` rows older than `cursor`, newest first, and the cursor of the next page."""
    sql, args = log_query(f, cursor, limit)
    rows = await pool.fetch(sql, *args)
    more = len(rows) > limit
    rows = rows[:limit]
    last = rows[-1] if rows else None
    return {
        "rows": [dict(r) for r in rows],
        "next_cursor": encode_cursor(last["created_at"], last["id"]) if more else None,
    }
