"""What the operator scripts share: the connection, one-line errors, and the expected schema.

The expected tables, columns, policies and functions are read from supabase/migrations/, the
only definition of the data, so a check can't drift from what the migrations create.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import asyncpg

from vtai.db import migrations
from vtai.db.connection import connect
from vtai.settings import Settings, SettingsError, load_settings

# Exit codes shared by the scripts (each script's --help repeats them).
OK, DRIFT, USAGE, DB_ERROR = 0, 1, 2, 3

# The functions only the server may run (the migration revokes them from user-level roles).
SERVER_ONLY_FUNCTIONS = (
    "vtai_reserve",
    "vtai_record",
    "vtai_record_batch",
    "vtai_release",
    "vtai_usage",
    "vtai_verify_counters",
    "vtai_session_start",
    "vtai_session_live",
    "vtai_session_end",
    "vtai_sessions_end_all",
    "vtai_login_attempt",
    "vtai_login_succeeded",
)
USER_ROLES = ("anon", "authenticated")


class ScriptError(Exception):
    """Stops a script: str() is the one line to print, `code` the exit code."""

    def __init__(self, message: str, code: int = DB_ERROR):
        super().__init__(message)
        self.code = code


def parser(description: str, epilog: str) -> argparse.ArgumentParser:
    """The scripts' shared command line: a description, the exit codes, and --db-url."""
    p = argparse.ArgumentParser(
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--db-url",
        help="postgresql://... (default: the app's database, VTAI_DATABASE_URL, then "
        "SUPABASE_DB_URL, from the environment or .env)",
    )
    return p


def settings() -> Settings:
    """The app's settings (vtai.settings: the environment, then .env); a bad value is one line."""
    try:
        return load_settings()
    except SettingsError as exc:
        raise ScriptError(str(exc), USAGE) from None


def database_url(cli_value: str | None) -> str:
    """--db-url, else the database the app uses (VTAI_DATABASE_URL wins over SUPABASE_DB_URL)."""
    if cli_value:
        return cli_value
    url = settings().database_url
    if url:
        return url
    raise ScriptError(
        "no database URL: pass --db-url or set VTAI_DATABASE_URL (or SUPABASE_DB_URL) in .env",
        USAGE,
    )


def redact(text: str, url: str) -> str:
    """Remove the URL's password from a message that might quote it."""
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    return text.replace(password, "***") if password else text


async def open_connection(url: str) -> asyncpg.Connection:
    try:
        return await connect(url)
    except Exception as exc:  # DatabaseError from vtai.db.connection, or a malformed URL
        raise ScriptError(redact(str(exc) or type(exc).__name__, url)) from None


def describe_sql_error(exc: BaseException, url: str, doing: str) -> str:
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return redact(
            f"{doing}: the database user lacks a privilege ({exc}); connect as the project's "
            "owner role (postgres on Supabase)",
            url,
        )
    return redact(f"{doing}: {type(exc).__name__}: {exc}", url)


def run(main, argv: list[str] | None = None) -> int:
    """Run an async main(argv) and turn every failure into one line on stderr."""
    import asyncio

    try:
        return asyncio.run(main(argv))
    except ScriptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("error: interrupted; the step that was running was rolled back", file=sys.stderr)
        return DB_ERROR


# --- The expected schema, read from the migrations -------------------------------------------

_CREATE_TABLE = re.compile(
    r"create table if not exists ([\w.]+) \((.*?)\n\);", re.IGNORECASE | re.DOTALL
)
_DROP_COLUMN = re.compile(r"alter table ([\w.]+) drop column (?:if exists )?(\w+)", re.I)
_NOT_COLUMN = ("primary", "unique", "check", "constraint", "foreign", "--", "exclude")
_TYPE_END = re.compile(
    r"\s+(not\b|null\b|default\b|primary\b|references\b|check\b|unique\b|generated\b)", re.I
)
_POLICY = re.compile(
    r'create policy "([^"]+)" on ([\w.]+)\s+for (\w+)\s+to ([\w, ]+?)\s+(?:using|with)', re.I
)
_FUNCTION = re.compile(r"create or replace function public\.(\w+)\(", re.I)
_TYPE_ALIASES = {
    "timestamptz": "timestamp with time zone",
    "int": "integer",
    "int4": "integer",
    "int8": "bigint",
    "bool": "boolean",
}


@dataclass(frozen=True)
class Policy:
    table: str
    name: str
    command: str
    roles: tuple[str, ...]


@dataclass
class Expected:
    tables: dict[str, dict[str, str]] = field(default_factory=dict)
    policies: list[Policy] = field(default_factory=list)
    functions: list[str] = field(default_factory=list)


def _qualify(name: str) -> str:
    return name if "." in name else f"public.{name}"


def normalize_type(text: str) -> str:
    text = re.sub(r"\s*,\s*", ",", text.strip().lower())
    return _TYPE_ALIASES.get(text, text)


def expected_schema() -> Expected:
    sql = "\n".join(m.sql for m in [*migrations.discover(), *migrations.discover_functions()])
    expected = Expected()
    for table, body in _CREATE_TABLE.findall(sql):
        columns = {}
        for line in body.splitlines():
            line = line.strip().rstrip(",")
            if not line or line.lower().startswith(_NOT_COLUMN):
                continue
            name, _, rest = line.partition(" ")
            columns[name] = normalize_type(_TYPE_END.split(rest, maxsplit=1)[0])
        expected.tables[_qualify(table)] = columns
    for table, column in _DROP_COLUMN.findall(sql):
        expected.tables.get(_qualify(table), {}).pop(column, None)
    for name, table, command, roles in _POLICY.findall(sql):
        expected.policies.append(
            Policy(
                _qualify(table),
                name,
                command.upper(),
                tuple(sorted(r.strip() for r in roles.split(","))),
            )
        )
    expected.functions = sorted(set(_FUNCTION.findall(sql)))
    return expected


async def actual_policies(conn: asyncpg.Connection, tables) -> list[Policy]:
    rows = await conn.fetch(
        "select schemaname || '.' || tablename as tbl, policyname, cmd, roles::text[] as roles"
        " from pg_policies where schemaname || '.' || tablename = any($1::text[])"
        " order by 1, 2",
        list(tables),
    )
    return [Policy(r["tbl"], r["policyname"], r["cmd"], tuple(sorted(r["roles"]))) for r in rows]


async def unexpected_policies(conn: asyncpg.Connection, expected: Expected) -> list[Policy]:
    wanted = {(p.table, p.name) for p in expected.policies}
    return [p for p in await actual_policies(conn, VTAI_TABLES) if (p.table, p.name) not in wanted]


def quote_table(qualified: str) -> str:
    schema, _, table = qualified.partition(".")
    return f'"{schema}"."{table}"'


# Every table the migrations create (by `create table if not exists schema.name`): checked for
# RLS, policies and grants. Read from the files so a new migration is covered without edits.
VTAI_TABLES = tuple(expected_schema().tables)
