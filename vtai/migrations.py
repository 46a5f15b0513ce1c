"""Apply `supabase/migrations/*.sql` in order and record them where the Supabase CLI does.

`supabase db push` and VT.ai agree on what has been applied because both use
`supabase_migrations.schema_migrations(version, statements, name)`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "supabase" / "migrations"
_NAME = re.compile(r"^(\d{14})_(\w+)\.sql$")
# Any fixed number works; it keeps two processes from migrating the same database at once.
_LOCK_KEY = 0x76746169

HISTORY_TABLE = """
create schema if not exists supabase_migrations;
create table if not exists supabase_migrations.schema_migrations (version text primary key);
alter table supabase_migrations.schema_migrations add column if not exists statements text[];
alter table supabase_migrations.schema_migrations add column if not exists name text;
"""


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if not match:
            raise ValueError(f"{path.name}: migration files are named YYYYMMDDHHMMSS_name.sql")
        found.append(Migration(match.group(1), match.group(2), path))
    return found


async def applied_versions(conn: asyncpg.Connection) -> set[str]:
    exists = await conn.fetchval("select to_regclass('supabase_migrations.schema_migrations')")
    if exists is None:
        return set()
    return {
        r["version"]
        for r in await conn.fetch("select version from supabase_migrations.schema_migrations")
    }


async def pending(conn: asyncpg.Connection, directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    done = await applied_versions(conn)
    return [m for m in discover(directory) if m.version not in done]


async def apply_pending(
    conn: asyncpg.Connection, directory: Path = MIGRATIONS_DIR
) -> list[Migration]:
    """Apply what is pending, each file in its own transaction; return what was applied."""
    await conn.execute("select pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(HISTORY_TABLE)
        todo = await pending(conn, directory)
        for migration in todo:
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "insert into supabase_migrations.schema_migrations (version, statements, name)"
                    " values ($1, $2, $3)",
                    migration.version,
                    [migration.sql],
                    migration.name,
                )
        return todo
    finally:
        await conn.execute("select pg_advisory_unlock($1)", _LOCK_KEY)
