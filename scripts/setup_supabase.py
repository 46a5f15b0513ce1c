"""Set up (or check) VT.ai's tables, policies, functions and grants on Supabase or Postgres.

    python scripts/setup_supabase.py                 # apply pending migrations, then verify
    python scripts/setup_supabase.py --check         # verify only; exit 1 on drift
    python scripts/setup_supabase.py --print-sql     # pending migrations' SQL for the SQL editor
    python scripts/setup_supabase.py --print-sql --all

The database URL comes from --db-url, else the app's: VTAI_DATABASE_URL, then SUPABASE_DB_URL
(from the environment, then .env), read by vtai.settings as the app reads it.
"""

from __future__ import annotations

import sys

import asyncpg
from _common import (
    DRIFT,
    OK,
    SERVER_ONLY_FUNCTIONS,
    USER_ROLES,
    VTAI_TABLES,
    ScriptError,
    actual_policies,
    database_url,
    describe_sql_error,
    expected_schema,
    normalize_type,
    open_connection,
    quote_table,
    run,
)
from _common import (
    parser as common_parser,
)

from vtai.db import migrations

EPILOG = """exit codes:
  0  everything is in place
  1  --check found drift (each problem is a FAIL line)
  2  bad arguments or no database URL
  3  the database can't be used: unreachable, bad credentials, missing privilege, or a
     migration failed (one line says which and what to do)
"""

TABLE_PRIVILEGES = ("select", "insert", "update", "delete", "truncate", "references", "trigger")


class Report:
    def __init__(self) -> None:
        self.failures = 0

    def ok(self, text: str) -> None:
        print(f"ok    {text}")

    def fail(self, text: str) -> None:
        self.failures += 1
        print(f"FAIL  {text}")

    def warn(self, text: str) -> None:
        print(f"warn  {text}")

    def check(self, passed: bool, text: str, problem: str = "") -> None:
        if passed:
            self.ok(text)
        else:
            self.fail(f"{text}: {problem}" if problem else text)


def migration_script(
    todo: migrations.Plan, functions: list[migrations.FunctionFile] | None = None
) -> str:
    """SQL to paste into the Supabase SQL editor; records each file as setup would.
    `functions`: the function files to (re)apply after the migrations; default all of them."""
    parts = [
        "-- VT.ai migrations for the Supabase SQL editor. Each file runs in its own transaction",
        "-- and is recorded where `supabase db push` and VT.ai look for applied migrations.",
        migrations.HISTORY_TABLE.strip(),
    ]
    try:
        if todo.adopt:
            parts += [
                "\n-- This database was migrated with the files before the schema baseline: record",
                "-- the baseline as applied without running it (docs/supabase.md).",
                "begin;",
                migrations.adoption_sql(todo.adopt).strip(),
                "commit;",
            ]
        for m in todo.todo:
            parts += [f"\n-- {m.path.name}", "begin;", m.sql.strip(), migrations.record_sql(m)]
            parts.append("commit;")
        for f in migrations.discover_functions() if functions is None else functions:
            parts += [f"\n-- functions/{f.name}", "begin;", f.sql.strip()]
            parts += [migrations.function_record_sql(f), "commit;"]
    except ValueError as exc:
        raise ScriptError(f"{exc} for the editor") from None
    return "\n".join(parts) + "\n"


async def apply(conn: asyncpg.Connection, url: str) -> int:
    """Apply what is pending; return how many changes were made."""
    try:
        applied = await migrations.apply_pending(conn, say=lambda line: print(f"note  {line}"))
    except asyncpg.PostgresError as exc:
        raise ScriptError(describe_sql_error(exc, url, "a migration failed")) from None
    for m in applied:
        print(f"applied {m.label}")
    if not applied:
        print("migrations: none pending")
    return len(applied)


async def verify(conn: asyncpg.Connection) -> Report:
    report = Report()
    expected = expected_schema()

    try:
        todo = await migrations.plan(conn)
    except migrations.MigrationError as exc:
        report.fail(f"migrations applied: {exc}")
    else:
        if todo.adopt:
            report.fail(
                "migrations applied: this database was migrated with the files before the schema"
                " baseline; run scripts/setup_supabase.py (or start VT.ai) to move it onto the"
                " baseline"
            )
        else:
            report.check(
                not todo.todo,
                "migrations applied",
                f"{len(todo.todo)} pending ({', '.join(m.version for m in todo.todo)})",
            )
    stale = await migrations.stale_functions(conn)
    report.check(
        not stale,
        "function files applied",
        f"{', '.join(f.name for f in stale)} not applied as they are now: run"
        " scripts/setup_supabase.py"
        if stale
        else "",
    )
    changed = await migrations.changed(conn)
    report.check(
        not changed,
        "migration files unchanged since they were applied",
        migrations.describe_changed(changed) if changed else "",
    )

    for table, columns in expected.tables.items():
        rows = await conn.fetch(
            "select a.attname, format_type(a.atttypid, a.atttypmod) as type"
            " from pg_attribute a where a.attrelid = to_regclass($1) and a.attnum > 0"
            " and not a.attisdropped",
            table,
        )
        if not rows:
            report.fail(f"table {table}: missing")
            continue
        have = {r["attname"]: normalize_type(r["type"]) for r in rows}
        missing = [c for c in columns if c not in have]
        wrong = [f"{c} is {have[c]}, not {t}" for c, t in columns.items() if have.get(c, t) != t]
        report.check(
            not missing and not wrong,
            f"table {table}: {len(columns)} expected columns",
            "; ".join(([f"missing {', '.join(missing)}"] if missing else []) + wrong),
        )

    for table in VTAI_TABLES:
        enabled = await conn.fetchval(
            "select relrowsecurity from pg_class where oid = to_regclass($1)", table
        )
        if enabled is not None:
            report.check(enabled, f"row-level security on {table}", "disabled")

    actual = {(p.table, p.name): p for p in await actual_policies(conn, VTAI_TABLES)}
    for want in expected.policies:
        have = actual.pop((want.table, want.name), None)
        label = f'policy "{want.name}" on {want.table}'
        if have is None:
            report.fail(f"{label}: missing")
        else:
            report.check(
                (have.command, have.roles) == (want.command, want.roles),
                label,
                f"is {have.command} to {', '.join(have.roles)}; expected {want.command} to "
                f"{', '.join(want.roles)}",
            )
    for extra in actual.values():
        report.fail(
            f'unexpected policy "{extra.name}" on {extra.table} ({extra.command} to '
            f"{', '.join(extra.roles)}): run scripts/update_request_logs_rls.py"
        )
    if not expected.policies:
        report.fail("no policies found in the migrations: the check itself is broken")

    for name in expected.functions:
        found = await conn.fetchval(
            "select count(*) from pg_proc where proname = $1"
            " and pronamespace = 'public'::regnamespace",
            name,
        )
        report.check(found > 0, f"function public.{name}", "missing")

    for table in VTAI_TABLES:
        if await conn.fetchval("select to_regclass($1)", table) is None:
            continue
        for role in USER_ROLES:
            granted = [
                p
                for p in TABLE_PRIVILEGES
                if await conn.fetchval(
                    "select has_table_privilege($1, $2, $3)", role, quote_table(table), p
                )
            ]
            if role == "authenticated" and table != "vtai_private.credentials":
                # Signed-in users may read (RLS narrows it to their rows), never write.
                granted = [p for p in granted if p != "select"]
            report.check(not granted, f"{role} can't write {table}", ", ".join(granted))
    for role in USER_ROLES:
        report.check(
            not await conn.fetchval(
                "select has_table_privilege($1, 'vtai_private.credentials', 'select')"
                " or has_schema_privilege($1, 'vtai_private', 'usage')",
                role,
            ),
            f"{role} can't read vtai_private.credentials",
            "it can",
        )

    signatures = await conn.fetch(
        "select proname, oid::regprocedure::text as sig from pg_proc"
        " where pronamespace = 'public'::regnamespace and proname = any($1::text[])",
        list(SERVER_ONLY_FUNCTIONS),
    )
    for fn in signatures:
        for role in USER_ROLES:
            report.check(
                not await conn.fetchval(
                    "select has_function_privilege($1, $2::regprocedure, 'execute')",
                    role,
                    fn["sig"],
                ),
                f"{role} can't execute {fn['proname']}()",
                "it can: anyone signed in could reserve or record on anyone's behalf",
            )
        report.check(
            await conn.fetchval(
                "select has_function_privilege('service_role', $1::regprocedure, 'execute')",
                fn["sig"],
            ),
            f"service_role can execute {fn['proname']}()",
            "it can't: the supabase client path would fail",
        )

    if await conn.fetchval("select to_regprocedure('public.vtai_verify_counters()')"):
        mismatches = await conn.fetch("select * from public.vtai_verify_counters() limit 6")
        report.check(
            not mismatches,
            "usage counters equal the ledger",
            f"{len(mismatches)}{'+' if len(mismatches) > 5 else ''} (user, period) differ,"
            " see: select * from vtai_verify_counters()",
        )

    if await conn.fetchval("select to_regclass('public.usage_logs')") is not None:
        rows = await conn.fetchval("select count(*) from public.usage_logs")
        report.warn(
            f"legacy public.usage_logs still holds {rows} row(s):"
            " run scripts/migrate_remove_usage_logs.py"
        )
    return report


async def main(argv: list[str] | None) -> int:
    parser = common_parser(
        "Apply VT.ai's migrations to a Supabase or Postgres database and verify "
        "its tables, row-level security, policies, functions and grants.",
        EPILOG,
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="verify only; exit 1 on drift")
    mode.add_argument(
        "--print-sql",
        action="store_true",
        help="print the pending migrations' SQL for the Supabase SQL editor instead of applying",
    )
    parser.add_argument("--all", action="store_true", help="with --print-sql: every migration")
    args = parser.parse_args(argv)
    if args.all and not args.print_sql:
        parser.error("--all only goes with --print-sql")

    if args.print_sql and args.all:
        sys.stdout.write(migration_script(migrations.Plan(todo=migrations.discover())))
        return OK

    url = database_url(args.db_url)
    conn = await open_connection(url)
    try:
        if args.print_sql:
            try:
                todo = await migrations.plan(conn)
            except migrations.MigrationError as exc:
                raise ScriptError(str(exc)) from None
            sys.stdout.write(migration_script(todo, await migrations.stale_functions(conn)))
            return OK
        changes = 0 if args.check else await apply(conn, url)
        try:
            report = await verify(conn)
        except asyncpg.PostgresError as exc:
            raise ScriptError(describe_sql_error(exc, url, "verification failed")) from None
    finally:
        await conn.close()
    if not args.check:
        print(f"changes: {changes if changes else 'none'}")
    if report.failures:
        print(f"{report.failures} problem(s) found", file=sys.stderr)
        return DRIFT
    print("all checks passed")
    return OK


if __name__ == "__main__":
    sys.exit(run(main))
