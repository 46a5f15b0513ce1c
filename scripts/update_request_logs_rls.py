"""Put VT.ai's row-level security back as the migrations define it, on a drifted database.

Drops every policy on VT.ai's tables that the migrations don't define (the legacy permissive
ones included) and the legacy policies on usage_logs, then re-runs the migration files, which
are idempotent, so the expected policies, revokes and grants come from the same SQL as on a
fresh database. Everything happens in one transaction; --dry-run rolls it back.
"""

from __future__ import annotations

import sys

import asyncpg
from _common import (
    OK,
    VTAI_TABLES,
    ScriptError,
    actual_policies,
    database_url,
    describe_sql_error,
    expected_schema,
    open_connection,
    run,
)
from _common import (
    parser as common_parser,
)

from vtai.db import migrations

EPILOG = """exit codes:
  0  the policies are as the migrations define them (or would be, with --dry-run)
  2  bad arguments or no database URL
  3  the database can't be used (one line says why and what to do)
"""

LEGACY_TABLES = ("public.usage_logs",)


def _label(p) -> str:
    return f'"{p.name}" on {p.table} ({p.command} to {", ".join(p.roles)})'


async def repair(conn: asyncpg.Connection, dry_run: bool) -> tuple[list, list]:
    """Return (dropped, created) policies; commits unless dry_run."""
    expected = expected_schema()
    wanted = {(p.table, p.name) for p in expected.policies}
    tables = VTAI_TABLES + LEGACY_TABLES
    tx = conn.transaction()
    await tx.start()
    try:
        before = await actual_policies(conn, tables)
        for p in before:
            if p.table in VTAI_TABLES and (p.table, p.name) not in wanted:
                schema, _, table = p.table.partition(".")
                await conn.execute(
                    f'drop policy "{p.name.replace(chr(34), chr(34) * 2)}" on "{schema}"."{table}"'
                )
        # Idempotent by design (tests/db/test_migrations.py re-runs them by hand); the legacy
        # one also drops the permissive policies on usage_logs by name.
        for m in [*migrations.discover(), *migrations.discover_functions()]:
            await conn.execute(m.sql)
        after = await actual_policies(conn, tables)
    except BaseException:
        await tx.rollback()
        raise
    if dry_run:
        await tx.rollback()
    else:
        await tx.commit()
    dropped = [p for p in before if p not in after]
    created = [p for p in after if p not in before]
    return dropped, created


async def main(argv: list[str] | None) -> int:
    parser = common_parser(
        "Drop policies on VT.ai tables that the migrations don't define and "
        "re-apply the expected policies, revokes and grants.",
        EPILOG,
    )
    parser.add_argument("--dry-run", action="store_true", help="show what would change")
    args = parser.parse_args(argv)

    url = database_url(args.db_url)
    conn = await open_connection(url)
    try:
        pending = await migrations.pending(conn)
        if pending:
            raise ScriptError(
                f"{len(pending)} migration(s) are pending: run scripts/setup_supabase.py first"
            )
        try:
            dropped, created = await repair(conn, args.dry_run)
        except asyncpg.PostgresError as exc:
            raise ScriptError(
                describe_sql_error(exc, url, "repair failed, nothing changed")
            ) from None
    finally:
        await conn.close()
    verb = "would " if args.dry_run else ""
    for p in dropped:
        print(f"{verb}drop policy {_label(p)}")
    for p in created:
        print(f"{verb}create policy {_label(p)}")
    if not dropped and not created:
        print("policies: already as the migrations define them")
    files = len(migrations.discover()) + len(migrations.discover_functions())
    print(f"{verb}re-apply revokes and grants from {files} migration and function files")
    return OK


if __name__ == "__main__":
    sys.exit(run(main))
