"""Apply `supabase/migrations/*.sql` in order and record them where the Supabase CLI does.

`supabase db push` and VT.ai agree on what has been applied because both use
`supabase_migrations.schema_migrations(version, statements, name)`. VT.ai adds one column,
`vtai_sha256`, the checksum of each file as it applied it: a file changed after it was applied
stops start-up with one line naming it (MigrationChanged), because the databases migrated before
and after the change would differ under the same version.

The schema is one baseline (BASELINE, five files) plus whatever follows it. A database migrated
with the twelve files VT.ai used before the baseline (V0, kept as tests/data/migrations_v0/) is
in the baseline's state, so when all twelve are recorded the baseline is recorded as applied
without running it, the old records move to `supabase_migrations.vtai_replaced_migrations`, and
only the files after the baseline run. Some but not all twelve recorded: refused with one line
(PartiallyMigrated). docs/supabase.md explains both to operators.

Function files (`supabase/migrations/functions/*.sql`, FUNCTIONS_DIR) hold the bodies of the
SQL functions that change as the rules do: each function has one body in the tree, and a rule
changes by editing its file. After the migrations, every function file whose text differs from
the one last applied runs again in its own transaction, and its checksum is recorded in
FUNCTIONS_TABLE. The Supabase CLI ignores the subdirectory, so `supabase db push` alone does
not install them: `scripts/setup_supabase.py` (or start-up) does.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "supabase" / "migrations"
FUNCTIONS_DIR = MIGRATIONS_DIR / "functions"
FUNCTIONS_TABLE = "supabase_migrations.vtai_function_files"
_NAME = re.compile(r"^(\d{14})_(\w+)\.sql$")
# Any fixed number works; it keeps two processes from migrating the same database at once.
_LOCK_KEY = 0x76746169

HISTORY_TABLE = """
create schema if not exists supabase_migrations;
create table if not exists supabase_migrations.schema_migrations (version text primary key);
alter table supabase_migrations.schema_migrations add column if not exists statements text[];
alter table supabase_migrations.schema_migrations add column if not exists name text;
alter table supabase_migrations.schema_migrations add column if not exists vtai_sha256 text;
create table if not exists supabase_migrations.vtai_function_files (
  name text primary key,
  sha256 text not null,
  applied_at timestamptz not null default now()
);
alter table supabase_migrations.vtai_function_files
  add column if not exists version integer not null default 0;
"""

# The baseline: together, the final state of the V0 files.
BASELINE = (
    "20261121000000",  # supabase_compat
    "20261121000100",  # legacy_request_logs
    "20261121000200",  # baseline
    "20261121000300",  # chat_history
    "20261121000400",  # legacy_backfill
)
# The twelve files before the baseline (tests/data/migrations_v0/), by version.
V0 = {
    "20261122000000": "supabase_compat",
    "20261122000100": "profiles",
    "20261122000150": "legacy_request_logs",
    "20261122000200": "metering",
    "20261122000300": "legacy_counters",
    "20261122000400": "chat_history",
    "20261122000500": "usage_aggregates",
    "20261122000600": "provider_balances",
    "20261122000700": "batch_ledger",
    "20261122000800": "reserve_fast_path",
    "20261122000900": "release_reservation",
    "20261130000100": "login_sessions",
}
# The sha256 of their final text: a record of another text was applied from an earlier edit.
V0_SHA256 = {
    "20261122000000": "5c77b9b73536bb6dc2810de0ccd10392ced5d7638a8b3288379db3b7be909c99",
    "20261122000100": "8606b023fb973a06d47f6c17d16217b3488cab55e502ad641583b77fb82a982c",
    "20261122000150": "fbcc0b747c86a71301c7962b6c65e7b40e5c6fdd98acdbfe281cab8cca0944fe",
    "20261122000200": "72206578eec768b607b2fd148680e67b11a41fef85b51452741ca7ad4f054393",
    "20261122000300": "dc2af648ee7af6186db06db9cb30a32e68423fbb56d073221b6e9c242245eccf",
    "20261122000400": "bb762a9769d58259419a78e9b75871357495d5d7f91d725493be9a2f806de661",
    "20261122000500": "461934f5bceb2e7d2eadf915769749b7363b608aefe653f3c88b006f5e1a3b8e",
    "20261122000600": "b928f3f06a818ff0b8738a1fe6cb058cc4ed8466208531f32bc15736af8ae074",
    "20261122000700": "6cde2e42431b321a4d93796ffa8bb241cc4f0c8c658e6da63c4fd668c357ee8d",
    "20261122000800": "7b55e8f0949c9860499123f6394cb8571c389df29f0999c6ce8f928c77c2bd21",
    "20261122000900": "ed423814927f895dfda44ee4d4a7fae4fc10fef01e50d7e5eaa337063ab6cfc2",
    "20261130000100": "f6953bc73cdf1504425607480f6da75ba1cff47a7265ae3a4d19621b2fa6763c",
}
# Texts of applied files that a later release changed in one deliberate step, accepted as
# applied: the baseline, when the function bodies in it moved to FUNCTIONS_DIR (the copy is
# tests/data/baseline_v1/). The function files then replace those bodies on such a database.
EARLIER_SHA256 = {
    "20261121000200": {"25207a38d51b561ebad60e67435d0fa4383ed9f23e9b91eba9374d13da9881ae"},
}
# The last commit whose supabase/migrations/ holds the V0 files, named in PartiallyMigrated.
V0_COMMIT = "734d1eb"
# Where adoption keeps the records of the V0 files it takes out of schema_migrations.
REPLACED_TABLE = "supabase_migrations.vtai_replaced_migrations"
_QUOTE = "$vtai_migration$"


class MigrationError(asyncpg.PostgresError):
    """The migrations can't run on this database; str() is one line saying what to do.

    A PostgresError so that every caller that already turns a failed migration into one line
    (vtai.db.connection at start-up, the scripts) does the same with these."""


class MigrationChanged(MigrationError):
    """A migration file differs from the one applied to this database."""


class PartiallyMigrated(MigrationError):
    """Some, not all, of the files before the baseline are recorded."""


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    path: Path

    @property
    def sql(self) -> str:
        # Universal newlines: a checkout with CRLF line ends has the same text and checksum.
        return self.path.read_text(encoding="utf-8")

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()

    @property
    def label(self) -> str:
        return f"migration {self.version}_{self.name}"

    @property
    def file(self) -> str:
        """The path to show an operator: relative to the repository for VT.ai's own files."""
        try:
            return str(self.path.relative_to(MIGRATIONS_DIR.parent.parent))
        except ValueError:
            return str(self.path)


_VERSION = re.compile(r"^-- version: (\d+)\b", re.MULTILINE)


class FunctionsNewer(MigrationError):
    """The database holds a function file newer than this build's: an older build starting."""


@dataclass(frozen=True)
class FunctionFile:
    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def version(self) -> int:
        """The file's `-- version: N` line. Every change raises it (a test checks), so an
        older build never puts older rules back over newer ones."""
        match = _VERSION.search(self.sql)
        if not match:
            raise ValueError(f"{self.name} has no `-- version: N` line")
        return int(match.group(1))

    @property
    def label(self) -> str:
        return f"function file {self.name}"

    sql = Migration.sql
    sha256 = Migration.sha256
    file = Migration.file


def discover_functions(directory: Path = FUNCTIONS_DIR) -> list[FunctionFile]:
    return [FunctionFile(path) for path in sorted(directory.glob("*.sql"))]


async def stale_functions(
    conn: asyncpg.Connection, directory: Path = FUNCTIONS_DIR
) -> list[FunctionFile]:
    """Function files whose text differs from the one last applied (or never applied).
    Raises FunctionsNewer when the database's version of one is higher than this build's."""
    done: dict[str, tuple[str, int]] = {}
    if await conn.fetchval(f"select to_regclass('{FUNCTIONS_TABLE}')") is not None:
        has_version = await conn.fetchval(
            "select exists (select 1 from pg_attribute where attrelid ="
            f" '{FUNCTIONS_TABLE}'::regclass and attname = 'version' and not attisdropped)"
        )
        column = "version" if has_version else "0"
        rows = await conn.fetch(f"select name, sha256, {column} as version from {FUNCTIONS_TABLE}")
        done = {r["name"]: (r["sha256"], r["version"]) for r in rows}
    files = discover_functions(directory)
    newer = [
        f"{f.name} (version {done[f.name][1]} applied, {f.version} here)"
        for f in files
        if f.name in done and done[f.name][1] > f.version
    ]
    if newer:
        raise FunctionsNewer(
            f"this database's money functions are newer than this build's: {', '.join(newer)};"
            " start the newer build (an older one would put older rules back)"
        )
    return [f for f in files if done.get(f.name, ("", 0))[0] != f.sha256]


def function_record_sql(f: FunctionFile) -> str:
    """The statement that records function file `f` as applied."""
    return (
        f"insert into {FUNCTIONS_TABLE} (name, sha256, version)"
        f" values ('{f.name}', '{f.sha256}', {f.version})"
        " on conflict (name) do update set sha256 = excluded.sha256,"
        " version = excluded.version, applied_at = now();"
    )


@dataclass
class Plan:
    """What apply_pending does: move a V0 database onto the baseline, then run `todo`."""

    adopt: list[Migration] = field(default_factory=list)
    todo: list[Migration] = field(default_factory=list)


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if not match:
            raise ValueError(f"{path.name}: migration files are named YYYYMMDDHHMMSS_name.sql")
        found.append(Migration(match.group(1), match.group(2), path))
    return found


async def recorded(conn: asyncpg.Connection) -> dict[str, str | None]:
    """Every recorded version and its checksum (None: recorded without one)."""
    if await conn.fetchval("select to_regclass('supabase_migrations.schema_migrations')") is None:
        return {}
    has_sha = await conn.fetchval(
        "select exists (select 1 from pg_attribute where attrelid ="
        " 'supabase_migrations.schema_migrations'::regclass and attname = 'vtai_sha256'"
        " and not attisdropped)"
    )
    column = "vtai_sha256" if has_sha else "null::text"
    rows = await conn.fetch(f"select version, {column} from supabase_migrations.schema_migrations")
    return {r[0]: r[1] for r in rows}


async def applied_versions(conn: asyncpg.Connection) -> set[str]:
    return set(await recorded(conn))


async def pending(conn: asyncpg.Connection, directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The files not recorded as applied (on a V0 database not yet moved: the baseline too)."""
    done = await applied_versions(conn)
    return [m for m in discover(directory) if m.version not in done]


def _v0_label(version: str) -> str:
    return f"{version}_{V0[version]}"


async def plan(conn: asyncpg.Connection, directory: Path = MIGRATIONS_DIR) -> Plan:
    """What apply_pending would do; raises PartiallyMigrated on a partly migrated V0 database."""
    done = await applied_versions(conn)
    files = discover(directory)
    old = [v for v in V0 if v in done]
    if not old:
        return Plan(todo=[m for m in files if m.version not in done])
    if len(old) < len(V0):
        missing = ", ".join(_v0_label(v) for v in V0 if v not in done)
        raise PartiallyMigrated(
            f"this database has {len(old)} of the {len(V0)} migrations VT.ai used before its"
            f" schema baseline (missing: {missing}); finish them with the VT.ai that has them"
            f" (git archive {V0_COMMIT} | tar -x -C DIR, then PYTHONPATH=DIR python"
            " DIR/scripts/setup_supabase.py --db-url URL), then start this version, which"
            " moves the database onto the baseline (docs/supabase.md, 'Databases migrated"
            " before the baseline')"
        )
    baseline = [m for m in files if m.version in BASELINE]
    if [m.version for m in baseline] != list(BASELINE):
        raise MigrationError(
            f"{directory} lacks the baseline files {', '.join(BASELINE)}: this database was"
            " migrated before the baseline and can only be moved onto it with them"
        )
    adopt = [m for m in baseline if m.version not in done]
    return Plan(adopt=adopt, todo=[m for m in files if m.version not in done | set(BASELINE)])


def quoted(m: Migration) -> str:
    """The file's text as a dollar-quoted SQL literal."""
    if _QUOTE in m.sql:
        raise ValueError(f"{m.path.name} contains {_QUOTE}; it can't be quoted")
    return f"{_QUOTE}{m.sql}{_QUOTE}"


def record_sql(m: Migration) -> str:
    """The statement that records `m` as applied (with its text and checksum)."""
    return (
        "insert into supabase_migrations.schema_migrations (version, statements, name,"
        f" vtai_sha256) values ('{m.version}', array[{quoted(m)}], '{m.name}', '{m.sha256}')"
        " on conflict (version) do nothing;"
    )


def adoption_sql(baseline: list[Migration]) -> str:
    """Move a database migrated with every V0 file onto the baseline, without running it.

    The V0 records move to REPLACED_TABLE (so `supabase db push` finds no version it lacks a
    file for) and the baseline files are recorded as applied. One transaction's worth of SQL;
    it refuses unless all twelve V0 versions are recorded."""
    versions = "array[" + ", ".join(f"'{v}'" for v in V0) + "]"
    parts = [
        "do $$\nbegin\n"
        "  if (select count(*) from supabase_migrations.schema_migrations"
        f" where version = any({versions})) <> {len(V0)} then\n"
        "    raise exception 'not all of the migrations before the baseline are recorded:"
        " see docs/supabase.md';\n"
        "  end if;\nend\n$$;",
        f"create table if not exists {REPLACED_TABLE} (\n"
        "  version text primary key,\n  name text,\n  statements text[],\n"
        "  replaced_by text not null,\n  replaced_at timestamptz not null default now()\n);",
        f"insert into {REPLACED_TABLE} (version, name, statements, replaced_by)\n"
        f"select version, name, statements, '{BASELINE[0]}..{BASELINE[-1]}'"
        " from supabase_migrations.schema_migrations\n"
        f"where version = any({versions}) on conflict (version) do nothing;",
        f"delete from supabase_migrations.schema_migrations where version = any({versions});",
    ]
    parts += [record_sql(m) for m in baseline]
    return "\n".join(parts) + "\n"


async def _v0_applied_from_earlier_edits(conn: asyncpg.Connection) -> list[str]:
    """V0 files recorded with a text other than their final one (VT.ai's runner records the
    whole file; the Supabase CLI splits it into statements, which can't be compared)."""
    rows = await conn.fetch(
        "select version, statements from supabase_migrations.schema_migrations"
        " where version = any($1::text[]) order by version",
        list(V0),
    )
    return [
        _v0_label(r["version"])
        for r in rows
        if r["statements"] is not None
        and len(r["statements"]) == 1
        and hashlib.sha256(r["statements"][0].encode("utf-8")).hexdigest()
        != V0_SHA256[r["version"]]
    ]


async def changed(
    conn: asyncpg.Connection, directory: Path = MIGRATIONS_DIR
) -> list[tuple[Migration, str]]:
    """Applied files whose text differs from what was applied: (file, recorded checksum)."""
    done = await recorded(conn)
    return [
        (m, done[m.version])
        for m in discover(directory)
        if done.get(m.version)
        and done[m.version] != m.sha256
        and done[m.version] not in EARLIER_SHA256.get(m.version, ())
    ]


def describe_changed(found: list[tuple[Migration, str]]) -> str:
    files = ", ".join(m.file for m, _ in found)
    sums = "; ".join(f"{m.path.name}: {sha[:12]} applied, {m.sha256[:12]} now" for m, sha in found)
    one = len(found) == 1
    return (
        f"{files} changed after {'it was' if one else 'they were'} applied to this database"
        f" (sha256 {sums}): restore {'it' if one else 'them'} (git log -p --"
        " supabase/migrations) and put the change in a new migration file"
    )


async def _record_missing_checksums(
    conn: asyncpg.Connection, files: list[Migration], say: Callable[[str], None]
) -> None:
    """Files recorded without a checksum (by `supabase db push`): trust the file as it is now."""
    done = await recorded(conn)
    missing = [m for m in files if m.version in done and done[m.version] is None]
    for m in missing:
        await conn.execute(
            "update supabase_migrations.schema_migrations set vtai_sha256 = $2"
            " where version = $1 and vtai_sha256 is null",
            m.version,
            m.sha256,
        )
    if missing:
        say(
            f"recorded the checksum of {len(missing)} migration(s) applied without one: "
            + ", ".join(m.path.name for m in missing)
        )


async def apply_pending(
    conn: asyncpg.Connection,
    directory: Path = MIGRATIONS_DIR,
    say: Callable[[str], None] | None = None,
    functions: Path | None = None,
) -> list[Migration | FunctionFile]:
    """Apply what is pending, each file in its own transaction, then every stale function file
    (from `functions`, default: the `functions` folder of `directory`); return what ran.

    `say` gets one line for each thing worth telling an operator: a database moved onto the
    baseline, and the notices the migrations raise (row counts and time estimates before a
    long step). Default: this module's logger. Raises MigrationChanged, PartiallyMigrated."""
    say = say or log.info

    def notice(_conn, message) -> None:
        # RAISE NOTICE from the migrations themselves, not "... does not exist, skipping".
        text = getattr(message, "message", "") or ""
        if getattr(message, "sqlstate", None) == "00000" and not text.endswith(", skipping"):
            say(text)

    await conn.execute("select pg_advisory_lock($1)", _LOCK_KEY)
    conn.add_log_listener(notice)
    try:
        await conn.execute(HISTORY_TABLE)
        todo = await plan(conn, directory)
        if todo.adopt:
            edited = await _v0_applied_from_earlier_edits(conn)
            async with conn.transaction():
                await conn.execute(adoption_sql(todo.adopt))
            say(
                f"this database was migrated with the {len(V0)} files before the schema"
                f" baseline: recorded the baseline ({todo.adopt[0].version} to"
                f" {todo.adopt[-1].version}) as applied without running it; the old records"
                f" are in {REPLACED_TABLE}"
            )
            if edited:
                say(
                    f"warning: {', '.join(edited)} were applied from an earlier edit of the"
                    " file, so this database may differ from the baseline: re-apply its"
                    " definitions with python scripts/update_request_logs_rls.py"
                    " (docs/supabase.md, 'Databases migrated before the baseline')"
                )
        files = discover(directory)
        found = await changed(conn, directory)
        if found:
            raise MigrationChanged(describe_changed(found))
        await _record_missing_checksums(conn, files, say)
        for migration in todo.todo:
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "insert into supabase_migrations.schema_migrations"
                    " (version, statements, name, vtai_sha256) values ($1, $2, $3, $4)",
                    migration.version,
                    [migration.sql],
                    migration.name,
                    migration.sha256,
                )
        stale = await stale_functions(conn, functions or directory / "functions")
        for function_file in stale:
            async with conn.transaction():
                await conn.execute(function_file.sql)
                await conn.execute(function_record_sql(function_file))
        return [*todo.todo, *stale]
    finally:
        conn.remove_log_listener(notice)
        await conn.execute("select pg_advisory_unlock($1)", _LOCK_KEY)
