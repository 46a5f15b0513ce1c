"""Move the legacy usage_logs table into request_logs, verify, and drop it, in one transaction.

Every usage_logs row becomes one request_logs row keyed litellm_call_id = 'usage_logs-' || id,
so a re-run inserts nothing twice. The user becomes end_user when user_id is the uuid of a
profile; otherwise end_user stays null and the raw value is kept in legacy_end_user. Counters
get the copied tokens in the same transaction, so they keep equalling the ledger. usage_logs is
dropped only when row counts and token sums match.

Copied rows are charged to the period VTAI_USAGE_PERIOD names (default month) at their
created_at: the period the gate reads, so legacy usage of the current period counts as if it
had been recorded live, and older usage lands in periods that are over.
"""

from __future__ import annotations

import sys

import asyncpg
from _common import (
    OK,
    ScriptError,
    database_url,
    describe_sql_error,
    open_connection,
    run,
    settings,
)
from _common import parser as common_parser

from vtai.db import migrations
from vtai.settings import PERIODS

EPILOG = """exit codes:
  0  usage_logs was copied and dropped, or there was nothing to do (or would be, --dry-run)
  1  verification failed: counts or token sums differ; nothing was changed
  2  bad arguments or no database URL
  3  the database can't be used, or migrations are pending (one line says what to do)
"""

UUID_RE = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
VERIFY_FAILED = 1


def _col(columns: set[str], name: str, fallback: str = "null") -> str:
    return f"u.{name}" if name in columns else fallback


def source_sql(columns: set[str]) -> str:
    """usage_logs rows as request_logs values; both legacy shapes, missing columns tolerated."""
    tokens = {
        name: f"greatest(coalesce({_col(columns, name)}, 0), 0)::bigint"
        for name in ("input_tokens", "output_tokens", "total_tokens")
    }
    # A missing total is the sum of the parts (greatest() would make it 0 instead).
    total = (
        f"case when {_col(columns, 'total_tokens')} is null"
        f" then {tokens['input_tokens']} + {tokens['output_tokens']}"
        f" else {tokens['total_tokens']} end"
    )
    return f"""
      select u.id::text as legacy_id,
             {_col(columns, "user_id")}::text as raw_user,
             {_col(columns, "created_at")}::timestamptz as created_at,
             nullif({_col(columns, "session_id")}::text, '') as session_id,
             coalesce({_col(columns, "model_name")}::text, '') as model,
             least({tokens["input_tokens"]}, 2147483647)::integer as prompt_tokens,
             least({tokens["output_tokens"]}, 2147483647)::integer as completion_tokens,
             least({total}, 2147483647)::integer as total_tokens,
             case when {_col(columns, "cost")}::numeric between 0 and 1e10
                  then round({_col(columns, "cost")}::numeric, 8) else 0 end as total_cost,
             {_col(columns, "auth_method")}::text as auth_method
      from public.usage_logs u
    """


def copy_sql(columns: set[str]) -> str:
    return f"""
    with src as ({source_sql(columns)}),
    mapped as (
      select s.*, p.id as end_user,
             coalesce(s.created_at, timestamptz '1970-01-01 00:00:00+00') as at
      from src s
      left join public.profiles p
        on p.id = case when btrim(s.raw_user) ~ '{UUID_RE}' then btrim(s.raw_user)::uuid end
    ),
    copied as (
      insert into public.request_logs (
        litellm_call_id, created_at, end_user, legacy_end_user, session_id, model, status,
        prompt_tokens, completion_tokens, total_tokens, total_cost, period_start,
        additional_details)
      select 'usage_logs-' || m.legacy_id, m.at, m.end_user, m.raw_user, m.session_id, m.model,
             'success', m.prompt_tokens, m.completion_tokens, m.total_tokens, m.total_cost,
             public.vtai_period_start($1, m.at),
             jsonb_strip_nulls(jsonb_build_object(
               'migrated_from', 'usage_logs', 'legacy_id', m.legacy_id,
               'auth_method', m.auth_method,
               'created_at_unknown', case when m.created_at is null then true end))
      from mapped m
      on conflict (litellm_call_id) do nothing
      returning end_user, period_start, total_tokens
    ),
    counted as (
      insert into public.usage_counters as c (end_user, period_start, used)
      select end_user, period_start, sum(total_tokens)::bigint from copied
      where end_user is not null
      group by end_user, period_start
      on conflict (end_user, period_start) do update
      set used = c.used + excluded.used, updated_at = now()
      returning 1
    )
    select (select count(*) from copied) as inserted,
           (select count(*) from copied where end_user is null) as unmapped,
           (select coalesce(sum(total_tokens), 0) from copied) as tokens,
           (select count(*) from counted) as counters
    """


def verify_sql(columns: set[str]) -> str:
    return f"""
    with src as ({source_sql(columns)})
    select (select count(*) from src) as source_rows,
           (select coalesce(sum(total_tokens), 0) from src) as source_tokens,
           count(r.id) as copied_rows,
           coalesce(sum(r.total_tokens), 0) as copied_tokens
    from src s
    left join public.request_logs r on r.litellm_call_id = 'usage_logs-' || s.legacy_id
    """


async def migrate(conn: asyncpg.Connection, period: str, dry_run: bool) -> int:
    columns = {
        r["attname"]
        for r in await conn.fetch(
            "select attname from pg_attribute where attrelid = 'public.usage_logs'::regclass"
            " and attnum > 0 and not attisdropped"
        )
    }
    if "id" not in columns:
        raise ScriptError("public.usage_logs has no id column; can't key the copied rows")
    async with conn.transaction():
        # Whatever still writes usage_logs waits until the copy is committed or rolled back.
        await conn.execute("lock table public.usage_logs in exclusive mode")
        # A database whose request_logs was created fresh (never legacy) lacks this column.
        await conn.execute(
            "alter table public.request_logs add column if not exists legacy_end_user text"
        )
        result = await conn.fetchrow(copy_sql(columns), period)
        check = await conn.fetchrow(verify_sql(columns))
        print(
            f"usage_logs: {check['source_rows']} row(s), {check['source_tokens']} token(s);"
            f" {result['inserted']} copied now ({result['tokens']} tokens),"
            f" {check['copied_rows']} present in request_logs ({check['copied_tokens']} tokens)"
        )
        print(f"counters updated: {result['counters']} (user, {period}) pair(s)")
        if result["unmapped"]:
            users = await conn.fetch(
                "select legacy_end_user, count(*) as n from public.request_logs"
                ' where additional_details @> \'{"migrated_from": "usage_logs"}\''
                " and end_user is null group by 1 order by 2 desc limit 10"
            )
            shown = ", ".join(f"{r['legacy_end_user']!r} ({r['n']})" for r in users)
            print(
                f"kept {result['unmapped']} row(s) whose user_id matches no profile"
                f" (end_user null, raw value in legacy_end_user): {shown}"
            )
        if (check["source_rows"], check["source_tokens"]) != (
            check["copied_rows"],
            check["copied_tokens"],
        ):
            raise _Abort("verification failed: counts or token sums differ; nothing was changed")
        dependents = await conn.fetchval(
            "select string_agg(distinct classid::regclass::text || ' ' || objid::text, ', ')"
            " from pg_depend where refobjid = 'public.usage_logs'::regclass"
            " and deptype = 'n'"
        )
        if dependents:
            raise _Abort(
                f"usage_logs has dependent objects ({dependents}): drop them first; nothing "
                "was changed"
            )
        await conn.execute("drop table public.usage_logs")
        if dry_run:
            raise _DryRun
    return OK


class _Abort(Exception):
    pass


class _DryRun(Exception):
    pass


async def main(argv: list[str] | None) -> int:
    parser = common_parser(
        "Copy every legacy usage_logs row into request_logs (idempotently), "
        "update the usage counters, verify, and drop usage_logs, in one transaction.",
        EPILOG,
    )
    parser.add_argument("--dry-run", action="store_true", help="do it all, then roll back")
    parser.add_argument(
        "--period",
        choices=PERIODS,
        help="usage period the copied rows are charged to (default: VTAI_USAGE_PERIOD or month)",
    )
    args = parser.parse_args(argv)
    period = args.period or settings().usage_period

    url = database_url(args.db_url)
    conn = await open_connection(url)
    try:
        if await conn.fetchval("select to_regclass('public.usage_logs')") is None:
            print("nothing to do: public.usage_logs does not exist")
            return OK
        pending = await migrations.pending(conn)
        if pending:
            raise ScriptError(
                f"{len(pending)} migration(s) are pending: run scripts/setup_supabase.py first"
            )
        try:
            await migrate(conn, period, args.dry_run)
        except _DryRun:
            print("dry run: would drop public.usage_logs; rolled back, nothing changed")
            return OK
        except _Abort as exc:
            print(f"error: {exc}", file=sys.stderr)
            return VERIFY_FAILED
        except asyncpg.PostgresError as exc:
            raise ScriptError(
                describe_sql_error(exc, url, "migration failed, nothing changed")
            ) from None
    finally:
        await conn.close()
    print("dropped public.usage_logs")
    return OK


if __name__ == "__main__":
    sys.exit(run(main))
