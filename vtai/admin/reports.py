"""What /admin shows: cards and charts from `usage_aggregates`, the users table, tier
changes, and the request log one keyset page at a time.
"""

import asyncio
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


# The closed days and hours the reads below need, rolled up (each built once, the first time
# it is asked for), and the database's own day and hour: rollups cover what is before them,
# the live hour buckets what is after, so both sides agree on where a day or an hour ends.
_FILL = """
    select public.vtai_usage_rollups_fill($1::timestamptz, $2::timestamptz) as days,
           public.vtai_usage_hour_rollups_fill(
             coalesce($3::timestamptz, greatest($1, t.today)), $2)
             as hours,
           t.today, t.hour
    from (select date_trunc('day', now() at time zone 'UTC') at time zone 'UTC' as today,
                 date_trunc('hour', now() at time zone 'UTC') at time zone 'UTC' as hour) t
"""

# Every bucket of [$1, $2) once: closed days from usage_rollups, today's closed hours from
# usage_hour_rollups, the current hour from the live per-user hour buckets (a few thousand
# rows at most). $3 and $4: the database's day and hour (_FILL). `day` is the bucket's day.
_BUCKETS = """
    select bucket_start, bucket_start as day, model, requests, failures, refusals,
           prompt_tokens, completion_tokens, total_tokens, cost
    from public.usage_rollups
    where bucket_start >= $1::timestamptz
      and bucket_start < least($2::timestamptz, $3::timestamptz)
      and $4::timestamptz is not null
      and not (model = '' and requests = 0)
    union all
    select bucket_start, $3, model, requests, failures, refusals,
           prompt_tokens, completion_tokens, total_tokens, cost
    from public.usage_hour_rollups
    where bucket_start >= greatest($1, $3) and bucket_start < least($2, $4)
      and not (model = '' and requests = 0)
    union all
    select bucket_start, $3, model, requests, failures, refusals,
           prompt_tokens, completion_tokens, total_tokens, cost
    from public.usage_aggregates
    where granularity = 'hour' and bucket_start >= greatest($1, $4) and bucket_start < $2
"""

# Hour by hour (the one-day chart): closed hours' rollups, then the live buckets.
_HOURS = """
    select bucket_start, model, requests, failures, refusals,
           prompt_tokens, completion_tokens, total_tokens, cost
    from public.usage_hour_rollups
    where bucket_start >= $1::timestamptz
      and bucket_start < least($2::timestamptz, $4::timestamptz)
      and $3::timestamptz is not null and not (model = '' and requests = 0)
    union all
    select bucket_start, model, requests, failures, refusals,
           prompt_tokens, completion_tokens, total_tokens, cost
    from public.usage_aggregates
    where granularity = 'hour' and bucket_start >= greatest($1, $4) and bucket_start < $2
"""


# An end for "everything from here on" that Postgres and Python both hold.
_FAR = datetime(LAST_YEAR, 1, 1, tzinfo=UTC)


async def _filled(
    conn: asyncpg.Connection, start: datetime, end: datetime, hours_from: datetime | None = None
) -> tuple:
    """The day rollups of [start, end) built, and the hour rollups from `hours_from` (default:
    the database's today); returns the database's (today, current hour)."""
    row = await conn.fetchrow(_FILL, start, end, hours_from)
    return row["today"], row["hour"]


# Summaries being computed, by (pool, period): a request that arrives while one runs waits for
# it rather than starting another. Nothing is kept once it is done, so an answer is never older
# than the computation under way when it was asked for (~10 ms), but ten admins asking at
# once cost the database one summary, not ten (its count of users at their limit joins every
# user's counter of the period: ~5 ms at 10^4 users).
_summaries: dict[tuple[asyncpg.Pool, str], asyncio.Future] = {}


async def summary(pool: asyncpg.Pool, period: str, now: datetime | None = None) -> dict:
    if now is not None:  # a given time (tests, reports of the past): computed for the caller
        return await _summary(pool, period, now)
    key = (pool, period)
    running = _summaries.get(key)
    if running is None or running.get_loop() is not asyncio.get_running_loop():
        running = _summaries[key] = asyncio.ensure_future(_summary(pool, period, datetime.now(UTC)))
        running.add_done_callback(
            lambda done: _summaries.pop(key) if _summaries.get(key) is done else None
        )
    # shielded: one waiter going away (a closed tab) does not cancel it for the others
    return await asyncio.shield(running)


async def _summary(pool: asyncpg.Pool, period: str, now: datetime) -> dict:
    today = _day(now)
    # Totals over everyone: the calendar month when each subscriber has a period of their own.
    calendar = "month" if period == "billing" else period
    async with pool.acquire() as conn:
        period_start = await conn.fetchval("select public.vtai_period_start($1, $2)", calendar, now)
        since = min(today, period_start)
        db_today, db_hour = await _filled(conn, since, _FAR)
        totals = await conn.fetchrow(
            f"""
            with b as (
              select
                coalesce(sum(requests) filter (where bucket_start >= $5), 0)::bigint
                  as today_requests,
                coalesce(sum(total_tokens) filter (where bucket_start >= $5), 0)::bigint
                  as today_tokens,
                coalesce(sum(cost) filter (where bucket_start >= $5), 0) as today_cost,
                coalesce(sum(requests) filter (where bucket_start >= $6), 0)::bigint
                  as period_requests,
                coalesce(sum(total_tokens) filter (where bucket_start >= $6), 0)::bigint
                  as period_tokens,
                coalesce(sum(cost) filter (where bucket_start >= $6), 0) as period_cost
              from ({_BUCKETS}) x
            ), u as (
              -- active = the user's newest bucket on or after the day's (period's) start
              select count(*) filter (where last_hour >= $5) as today_users,
                     count(*) filter (where last_hour >= $6) as period_users
              from public.usage_last_active
              where last_hour >= least($5, $6) and end_user <> $7
            )
            select b.*, u.*,
              (select count(*) from public.profiles p
               join public.tiers t on t.name = p.tier
               join public.usage_counters c on c.end_user = p.id and c.period_start = $6
               where t.token_limit is not null and c.used >= t.token_limit) as at_limit
            from b, u
            """,
            since,
            _FAR,
            db_today,
            db_hour,
            today,
            period_start,
            NIL_USER,
        )
    t = dict(totals)
    return {
        "period": period,
        "period_start": period_start,
        "today": {k[6:]: t[k] for k in t if k.startswith("today_")},
        "this_period": {k[7:]: t[k] for k in t if k.startswith("period_")},
        "users_at_limit": t["at_limit"],
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
        buckets, key = _HOURS, "bucket_start"
    else:
        buckets, key = _BUCKETS, "day"
    async with pool.acquire() as conn:
        db_today, db_hour = await _filled(conn, start, end, start if key != "day" else None)
        sums = await conn.fetch(
            f"""
            select {key} as bucket_start, model, sum(requests)::bigint as requests,
                   sum(failures)::bigint as failures, sum(refusals)::bigint as refusals,
                   sum(prompt_tokens)::bigint as prompt_tokens,
                   sum(completion_tokens)::bigint as completion_tokens,
                   sum(total_tokens)::bigint as tokens, sum(cost) as cost
            from ({buckets}) b
            group by 1, 2
            """,
            start,
            end,
            db_today,
            db_hour,
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
    """The models with traffic in the last MODELS_DAYS days: from the rollups and the current
    hour's buckets, not a scan of every user's buckets."""
    end = _day(datetime.now(UTC)) + timedelta(days=1)
    start = end - timedelta(days=MODELS_DAYS)
    async with pool.acquire() as conn:
        db_today, db_hour = await _filled(conn, start, end)
        rows = await conn.fetch(
            f"select distinct model from ({_BUCKETS}) b where requests > 0 order by model",
            start,
            end,
            db_today,
            db_hour,
        )
    return [r["model"] for r in rows]


def _prefix(q: str) -> str:
    """`q` as a LIKE pattern matching names that start with it (its wildcards literal)."""
    return q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


async def user_table(
    pool: asyncpg.Pool,
    period: str,
    now: datetime | None = None,
    after: str | None = None,
    limit: int | None = None,
    q: str | None = None,
) -> dict:
    """Every user by name; or, with `limit`, one keyset page of them after the name `after`;
    `q`: only names starting with it, in any case. Last activity is one primary-key probe
    (usage_last_active), never a walk of the user's buckets."""
    now = now or datetime.now(UTC)
    rows = await pool.fetch(
        """
        select p.id, p.username, p.tier, p.is_admin, t.token_limit as limit,
               coalesce(c.used, 0) as used,
               case when t.token_limit is null then null
                    else greatest(t.token_limit - coalesce(c.used, 0), 0) end as remaining,
               -- one primary-key probe per user listed
               (select la.last_hour from public.usage_last_active la
                where la.end_user = p.id) as last_active
        from public.profiles p
        join public.tiers t on t.name = p.tier
        left join public.usage_counters c
          on c.end_user = p.id and c.period_start = case
            -- a subscriber's own period; else a constant the planner folds once
            when $1 = 'billing' then
              (select up.period_start from public.vtai_user_period(p.id, $1, $2) up)
            else public.vtai_period_start($1, $2) end
        where ($3::text is null or p.username > $3::text)
          and ($5::text is null or lower(p.username) like lower($5::text))
        order by p.username
        limit $4
        """,
        period,
        now,
        after,
        limit,
        _prefix(q) if q else None,
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


_LOG_SELECT = """
        select r.id, r.created_at, p.username, r.end_user, r.model, r.provider, r.status,
               r.prompt_tokens, r.completion_tokens, r.total_tokens,
               -- null: the model has no price in LiteLLM's map, so the cost is unknown
               case when r.additional_details @> '{"cost_unknown": true}' then null
                    else r.total_cost end as total_cost,
               r.response_time,
               coalesce((r.error ->> 'class') || ': ' || left(r.error ->> 'message', 200),
                        r.additional_details ->> 'reason') as error
        from public.request_logs r
        left join public.profiles p on p.id = r.end_user"""


# r.created_at as datetime.isoformat() writes it in UTC: microseconds only when there are some.
ISO_CREATED_AT = """to_char(r.created_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
    || case when to_char(r.created_at at time zone 'UTC', 'US') = '000000' then ''
            else '.' || to_char(r.created_at at time zone 'UTC', 'US') end
    || '+00:00'"""

# A log page's columns as its JSON holds them (the text of the time and the user id, the cost
# as a float), so encoding a page calls no Python per value.
_LOG_JSON_SELECT = f"""
        select r.id, {ISO_CREATED_AT} as created_at, p.username, r.end_user::text as end_user,
               r.model, r.provider, r.status,
               r.prompt_tokens, r.completion_tokens, r.total_tokens,
               case when r.additional_details @> '{{"cost_unknown": true}}' then null
                    else r.total_cost::float8 end as total_cost,
               r.response_time,
               coalesce((r.error ->> 'class') || ': ' || left(r.error ->> 'message', 200),
                        r.additional_details ->> 'reason') as error
        from public.request_logs r
        left join public.profiles p on p.id = r.end_user"""


def log_query(
    f: LogFilter, cursor: str | None, limit: int, select: str = _LOG_SELECT
) -> tuple[str, list]:
    """The keyset query for up to `limit` rows older than `cursor`, newest first. `select`:
    the columns and joins (`r`: request_logs), as the CSV export renders them."""
    where: list[str] = []
    args: list = []

    def arg(value) -> str:
        args.append(value)
        return f"${len(args)}"

    if f.user is not None:
        where.append(f"r.end_user = {arg(f.user)}")
    if f.model:
        where.append(f"r.model = {arg(f.model)}")
    if f.status in STATUSES:
        # A literal from the fixed list, not a parameter: a prepared statement's generic plan
        # can then still prove the partial index's `status <> 'success'` for a failure page.
        where.append(f"r.status = '{f.status}'")
    elif f.status:
        where.append(f"r.status = {arg(f.status)}")
    if f.start:
        where.append(f"r.created_at >= {arg(_utc_midnight(f.start))}")
    if f.end:
        where.append(f"r.created_at < {arg(_utc_midnight(f.end) + timedelta(days=1))}")
    if cursor:
        at, row_id = decode_cursor(cursor)
        where.append(f"(r.created_at, r.id) < ({arg(at)}, {arg(row_id)})")
    sql = f"""{select}
        {"where " + " and ".join(where) if where else ""}
        order by r.created_at desc, r.id desc
        limit {arg(limit + 1)}
        """
    return sql, args


async def log_page(
    pool: asyncpg.Pool, f: LogFilter, cursor: str | None = None, limit: int = PAGE_SIZE
) -> dict:
    """Up to `limit` rows older than `cursor`, newest first, and the cursor of the next page."""
    sql, args = log_query(f, cursor, limit, select=_LOG_JSON_SELECT)
    rows = await pool.fetch(sql, *args)
    more = len(rows) > limit
    rows = rows[:limit]
    last = rows[-1] if rows else None
    return {
        "rows": [dict(r) for r in rows],
        "next_cursor": (
            encode_cursor(datetime.fromisoformat(last["created_at"]), last["id"]) if more else None
        ),
    }
