"""Migrations: on an empty database, on re-runs, as a non-superuser on a Supabase-shaped one,
from a database migrated before the baseline, with a changed file, and two appliers at once."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import uuid
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import ROOT, create_database, drop_database, make_settings, with_database
from vtai.db import accounts, migrations
from vtai.db.connection import Database, DatabaseError

# Today's schema was squashed from these twelve files (test data, not migrations).
V0_DIR = ROOT / "tests" / "data" / "migrations_v0"
CHECKSUMS = migrations.MIGRATIONS_DIR / "CHECKSUMS"

MIGRATOR = "vtai_test_migrator"
MIGRATOR_PASSWORD = "migrator-test-password"

# What a hosted Supabase project looks like to the `postgres` role that runs migrations: not a
# superuser, owns nothing in auth, and default privileges hand anon and authenticated ALL on
# every new table and function in public.
SUPABASE_ROLES = f"""
do $$
declare r text;
begin
  foreach r in array array['anon', 'authenticated', 'service_role', 'supabase_auth_admin'] loop
    if not exists (select 1 from pg_roles where rolname = r) then
      execute format('create role %I nologin noinherit', r);
    end if;
  end loop;
  if not exists (select 1 from pg_roles where rolname = '{MIGRATOR}') then
    create role {MIGRATOR} login createrole password '{MIGRATOR_PASSWORD}';
  end if;
end $$;
alter role service_role bypassrls;
grant anon, authenticated, service_role to {MIGRATOR};
"""

SUPABASE_DATABASE = f"""
grant create, connect on database "{{db}}" to {MIGRATOR};
grant all on schema public to {MIGRATOR};
grant usage on schema public to anon, authenticated, service_role;
create schema auth authorization supabase_auth_admin;
grant usage on schema auth to anon, authenticated, service_role, {MIGRATOR};
create table auth.users (id uuid primary key, email text);
alter table auth.users owner to supabase_auth_admin;
create function auth.uid() returns uuid language sql stable as $f$
  select (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')::uuid
$f$;
create function auth.role() returns text language sql stable as $f$
  select nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role'
$f$;
create function auth.jwt() returns jsonb language sql stable as $f$
  select nullif(current_setting('request.jwt.claims', true), '')::jsonb
$f$;
alter function auth.uid() owner to supabase_auth_admin;
alter function auth.role() owner to supabase_auth_admin;
alter function auth.jwt() owner to supabase_auth_admin;
alter default privileges for role {MIGRATOR} in schema public
  grant all on tables to anon, authenticated, service_role;
alter default privileges for role {MIGRATOR} in schema public
  grant all on functions to anon, authenticated, service_role;
alter default privileges for role {MIGRATOR} in schema public
  grant all on sequences to anon, authenticated, service_role;
"""


async def create_supabase_database(pg_server: str) -> tuple[str, str]:
    """(superuser URL, migrator URL) of a new database shaped like a Supabase project."""
    url = await create_database(pg_server)
    admin = await asyncpg.connect(pg_server)
    try:
        await admin.execute(SUPABASE_ROLES)
    finally:
        await admin.close()
    db = url.rsplit("/", 1)[1]
    su = await asyncpg.connect(url)
    try:
        await su.execute(SUPABASE_DATABASE.format(db=db))
    finally:
        await su.close()
    parts = url.split("://", 1)[1].split("@", 1)[1]
    return url, f"postgresql://{MIGRATOR}:{MIGRATOR_PASSWORD}@{parts}"


@pytest.fixture
async def supabase_db(pg_server):
    """(superuser URL, migrator URL) of a fresh database shaped like a Supabase project."""
    url, migrator_url = await create_supabase_database(pg_server)
    yield url, migrator_url
    await drop_database(pg_server, url)


async def test_migrations_apply_on_empty_database_and_rerun_is_noop(empty_db_url):
    conn = await asyncpg.connect(empty_db_url)
    try:
        applied = await migrations.apply_pending(conn)
        everything = [*migrations.discover(), *migrations.discover_functions()]
        assert [m.label for m in applied] == [m.label for m in everything]
        assert migrations.discover_functions(), "the money functions live in function files"
        recorded = await conn.fetch(
            "select version, name from supabase_migrations.schema_migrations order by version"
        )
        assert [(r["version"], r["name"]) for r in recorded] == [
            (m.version, m.name) for m in migrations.discover()
        ]
        checksums = await conn.fetch(
            "select vtai_sha256 from supabase_migrations.schema_migrations order by version"
        )
        assert [r[0] for r in checksums] == [m.sha256 for m in migrations.discover()]
        assert await migrations.apply_pending(conn) == []
        # Every migration and function file is also safe to run again by hand.
        for m in everything:
            await conn.execute(m.sql)
        tiers = await conn.fetch("select name, token_limit from tiers order by rank")
        assert [(r["name"], r["token_limit"]) for r in tiers] == [
            ("free", 10_000),
            ("basic", 100_000),
            ("premium", 500_000),
            ("unlimited", None),
        ]
    finally:
        await conn.close()


async def test_migrations_run_as_non_superuser_on_supabase_shaped_database(supabase_db):
    su_url, migrator_url = supabase_db
    conn = await asyncpg.connect(migrator_url)
    try:
        assert not await conn.fetchval("select rolsuper from pg_roles where rolname = current_user")
        await migrations.apply_pending(conn)
        assert await migrations.pending(conn) == []
    finally:
        await conn.close()
    su = await asyncpg.connect(su_url)
    try:
        # Supabase's own auth.uid() is left alone.
        owner = await su.fetchval(
            "select pg_get_userbyid(proowner) from pg_proc where oid = 'auth.uid()'::regprocedure"
        )
        assert owner == "supabase_auth_admin"
        # Default privileges granted anon ALL on sequences too: nobody but the server may
        # take or set a ledger id.
        sequences = await su.fetch(
            "select c.oid::regclass::text as seq from pg_class c"
            " join pg_namespace n on n.oid = c.relnamespace"
            " where c.relkind = 'S' and n.nspname = 'public'"
        )
        assert sequences, "the ledger's id has a sequence"
        for (seq,) in sequences:
            for role in ("anon", "authenticated"):
                for priv in ("usage", "select", "update"):
                    assert not await su.fetchval(
                        "select has_sequence_privilege($1, $2, $3)", role, seq, priv
                    ), (role, seq, priv)
        # Default privileges granted anon ALL; the migrations took every bit of it back.
        for table in (
            "profiles",
            "tiers",
            "request_logs",
            "usage_counters",
            "reservations",
            "daily_counters",
            "model_weights",
            "audit_log",
            "models",
        ):
            for role in ("anon",):
                for priv in ("select", "insert", "update", "delete"):
                    assert not await su.fetchval(
                        "select has_table_privilege($1, $2, $3)", role, f"public.{table}", priv
                    ), (role, table, priv)
        for fn in (
            "vtai_reserve(uuid,integer,integer,text,integer,timestamptz,text,numeric,numeric,"
            "boolean,integer)",
            "vtai_usage(uuid,text,timestamptz)",
            "vtai_verify_counters()",
            "vtai_model_weight(text)",
            "vtai_record(jsonb,text)",
            "vtai_record_batch(jsonb,text)",
            "vtai_release(uuid,uuid)",
        ):
            for role in ("anon", "authenticated"):
                assert not await su.fetchval(
                    "select has_function_privilege($1, $2, 'execute')", role, f"public.{fn}"
                ), (role, fn)
            assert await su.fetchval(
                "select has_function_privilege('service_role', $1, 'execute')", f"public.{fn}"
            )
    finally:
        await su.close()


def test_with_database_swaps_only_the_name():
    assert (
        with_database("postgresql://u:p@h:5/old?sslmode=require", "new")
        == "postgresql://u:p@h:5/new?sslmode=require"
    )


# --- The files themselves ----------------------------------------------------------------------


def test_each_function_has_exactly_one_body():
    pattern = re.compile(r"create(?:\s+or\s+replace)?\s+function\s+([\w.]+)", re.I)
    seen: dict[str, list[str]] = {}
    for m in [*migrations.discover(), *migrations.discover_functions()]:
        for name in pattern.findall(m.sql):
            seen.setdefault(name.lower(), []).append(m.path.name)
    twice = {name: files for name, files in seen.items() if len(files) > 1}
    assert not twice, f"functions defined more than once: {twice}"
    assert "public.vtai_reserve" in seen and "auth.uid" in seen


def test_checksums_file_pins_every_migration():
    """An applied migration is never edited: a change goes in a new file (and a new line here).

    Databases refuse to start with a file that changed after it was applied
    (migrations.MigrationChanged); this test catches the change before it is committed."""
    listed = {}
    for line in CHECKSUMS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            sha, name = line.split()
            listed[name] = sha
    files = {m.path.name: m.sha256 for m in migrations.discover()}
    changed = [n for n in files if n in listed and listed[n] != files[n]]
    assert not changed, (
        f"{', '.join(changed)} changed after release; restore them and put the change in a new"
        " migration file"
    )
    missing = [f"{files[n]}  {n}" for n in files if n not in listed]
    assert not missing, "add to supabase/migrations/CHECKSUMS:\n" + "\n".join(missing)
    assert set(listed) == set(files), f"CHECKSUMS names no file: {set(listed) - set(files)}"


def test_v0_copy_and_baseline_are_what_the_runner_knows():
    v0 = migrations.discover(V0_DIR)
    assert {m.version: m.name for m in v0} == migrations.V0
    assert {m.version: m.sha256 for m in v0} == migrations.V0_SHA256
    versions = [m.version for m in migrations.discover()]
    assert versions[: len(migrations.BASELINE)] == list(migrations.BASELINE)
    assert not set(migrations.V0) & set(versions)


# --- A database migrated with the twelve files before the baseline ----------------------------

OLD_HISTORY_TABLE = """
create schema if not exists supabase_migrations;
create table if not exists supabase_migrations.schema_migrations (version text primary key);
alter table supabase_migrations.schema_migrations add column if not exists statements text[];
alter table supabase_migrations.schema_migrations add column if not exists name text;
"""


async def apply_v0(conn, skip: tuple[str, ...] = ()) -> None:
    """What the runner before the baseline did: each V0 file in a transaction, recorded."""
    await conn.execute(OLD_HISTORY_TABLE)
    for m in migrations.discover(V0_DIR):
        if m.version in skip:
            continue
        async with conn.transaction():
            await conn.execute(m.sql)
            await conn.execute(
                "insert into supabase_migrations.schema_migrations (version, statements, name)"
                " values ($1, $2, $3)",
                m.version,
                [m.sql],
                m.name,
            )


SCHEMAS = ["public", "vtai_private", "auth"]
CATALOG = {
    "relations": """
        select n.nspname || '.' || c.relname, c.relkind::text, c.relrowsecurity,
               c.relforcerowsecurity, pg_get_userbyid(c.relowner),
               array(select a::text from unnest(c.relacl) a order by 1)
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where n.nspname = any($1) order by 1""",
    "columns": """
        select c.oid::regclass::text, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod),
               a.attnotnull, a.attidentity::text, pg_get_expr(d.adbin, d.adrelid)
        from pg_attribute a join pg_class c on c.oid = a.attrelid
        join pg_namespace n on n.oid = c.relnamespace
        left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
        where n.nspname = any($1) and a.attnum > 0 and not a.attisdropped
          and c.relkind in ('r', 'p', 'v')
        order by 1, 2""",
    "constraints": """
        select conrelid::regclass::text, conname, pg_get_constraintdef(oid)
        from pg_constraint where connamespace = any($1::regnamespace[]) order by 1, 2""",
    "indexes": """
        select schemaname, tablename, indexname, indexdef from pg_indexes
        where schemaname = any($1) order by 1, 2, 3""",
    "policies": """
        select schemaname, tablename, policyname, permissive, roles::text[], cmd, qual,
               with_check
        from pg_policies where schemaname = any($1) order by 1, 2, 3""",
    "functions": """
        select p.oid::regprocedure::text, pg_get_function_arguments(p.oid),
               pg_get_function_result(p.oid), l.lanname, p.provolatile::text, p.prosecdef,
               p.proconfig, md5(p.prosrc), pg_get_userbyid(p.proowner),
               array(select a::text from unnest(p.proacl) a order by 1)
        from pg_proc p join pg_language l on l.oid = p.prolang
        where p.pronamespace = any($1::regnamespace[]) order by 1""",
    "triggers": """
        select t.tgrelid::regclass::text, t.tgname, pg_get_triggerdef(t.oid)
        from pg_trigger t join pg_class c on c.oid = t.tgrelid
        where not t.tgisinternal and c.relnamespace = any($1::regnamespace[]) order by 1, 2""",
    "schemas": """
        select nspname, pg_get_userbyid(nspowner), array(select a::text from unnest(nspacl) a
        order by 1) from pg_namespace where nspname = any($1) order by 1""",
}


async def catalog(conn) -> dict[str, list[tuple]]:
    return {k: [tuple(r) for r in await conn.fetch(q, SCHEMAS)] for k, q in CATALOG.items()}


DATA_TABLES = [
    "public.tiers",
    "public.profiles",
    "vtai_private.credentials",
    "public.request_logs",
    "public.usage_counters",
    "public.reservations",
    "public.usage_aggregates",
    "public.provider_balances",
    "vtai_private.login_sessions",
    "vtai_private.login_throttle",
    'public."User"',
    'public."Thread"',
    'public."Step"',
]


async def dump(conn) -> dict[str, list]:
    return {t: await conn.fetch(f"select * from {t} order by 1, 2") for t in DATA_TABLES}


async def use_the_schema(conn) -> list[uuid.UUID]:
    """Users, turns, a reservation held, a login, a throttled guess, a chat, a balance."""
    ids = []
    for i, tier in enumerate(("free", "basic", "premium")):
        profile = await accounts.create_user(conn, f"user{i}", "correct horse battery", tier)
        ids.append(profile.id)
        rows = []
        for turn in range(3):
            grant = await conn.fetchrow(
                "select * from vtai_reserve($1, 10, 20, 'month')", profile.id
            )
            assert grant["granted"], grant
            rows.append(
                {
                    "litellm_call_id": f"call-{i}-{turn}",
                    "end_user": str(profile.id),
                    "reservation_id": str(grant["reservation_id"]),
                    "status": "success" if turn else "failure",
                    "model": "m",
                    "prompt_tokens": 10,
                    "completion_tokens": 5 + turn,
                    "total_cost": 0.001,
                }
            )
        assert (
            await conn.fetchval("select vtai_record_batch($1::jsonb, 'month')", json.dumps(rows))
            == [True] * 3
        )
        await conn.fetchrow("select * from vtai_reserve($1, 5, 5, 'month')", profile.id)
        await conn.fetchval("select vtai_session_start($1, 3600)", profile.id)
    await conn.fetchval("select vtai_login_attempt('user0', '10.0.0.1')")
    await conn.execute(
        "insert into provider_balances (provider, balance, currency) values ('openai', 12.3, 'USD')"
    )
    await conn.execute("""insert into "User" (id, identifier) values ($1, 'user0')""", str(ids[0]))
    await conn.execute(
        """insert into "Thread" (id, "userId", name) values ('t1', $1, 'hello')""", str(ids[0])
    )
    await conn.execute(
        """insert into "Step" (id, "threadId", type, output) values ('s1', 't1', 'run', 'hi')"""
    )
    return ids


async def test_database_migrated_before_the_baseline_moves_onto_it_keeping_every_row(pg_server):
    old_su, old_url = await create_supabase_database(pg_server)
    new_su, new_url = await create_supabase_database(pg_server)
    lines: list[str] = []
    try:
        conn = await asyncpg.connect(old_url)
        try:
            await apply_v0(conn)
            ids = await use_the_schema(conn)
            before = await dump(conn)

            applied = await migrations.apply_pending(conn, say=lines.append)

            after_baseline = [
                m for m in migrations.discover() if m.version > max(migrations.BASELINE)
            ]
            # only the follow-ups written after the baseline, and the function files
            assert applied == [*after_baseline, *migrations.discover_functions()]
            assert any("recorded the baseline" in line for line in lines), lines
            assert not any("warning" in line for line in lines), lines
            recorded = await conn.fetch(
                "select version, vtai_sha256 from supabase_migrations.schema_migrations"
                " order by version"
            )
            assert [tuple(r) for r in recorded] == [
                (m.version, m.sha256) for m in migrations.discover()
            ]
            replaced = await conn.fetch(
                "select version, name, statements[1] as sql, replaced_by"
                f" from {migrations.REPLACED_TABLE} order by version"
            )
            assert [(r["version"], r["name"]) for r in replaced] == list(migrations.V0.items())
            assert [r["sql"] for r in replaced] == [m.sql for m in migrations.discover(V0_DIR)]
            if not after_baseline:
                assert await dump(conn) == before  # not a row lost or changed
            else:
                for table, rows in before.items():
                    assert len(await conn.fetch(f"select * from {table}")) >= len(rows), table
            assert await conn.fetch("select * from vtai_verify_counters()") == []
            assert await conn.fetch("select * from vtai_verify_aggregates()") == []
            assert await migrations.apply_pending(conn) == []

            # The app's functions go on working on the moved database.
            grant = await conn.fetchrow("select * from vtai_reserve($1, 10, 20)", ids[0])
            assert grant["granted"] and grant["used"] == 10 + 5 + 10 + 6 + 10 + 7
            assert await conn.fetchval(
                "select vtai_record(jsonb_build_object('litellm_call_id', 'after', 'end_user',"
                " $1::text, 'status', 'success', 'prompt_tokens', 10, 'reservation_id',"
                " $2::text))",
                str(ids[0]),
                str(grant["reservation_id"]),
            )
            assert await conn.fetch("select * from vtai_verify_counters()") == []
            moved = await catalog(conn)
        finally:
            await conn.close()

        fresh = await asyncpg.connect(new_url)
        try:
            await migrations.apply_pending(fresh)
            baseline = await catalog(fresh)
        finally:
            await fresh.close()
        for part in CATALOG:
            assert baseline[part], part  # the comparison compares something
            assert moved[part] == baseline[part], part
    finally:
        await drop_database(pg_server, old_su)
        await drop_database(pg_server, new_su)


async def test_adopting_names_v0_files_applied_from_an_earlier_edit(empty_db_url):
    conn = await asyncpg.connect(empty_db_url)
    try:
        await apply_v0(conn)
        # As if 20261122000700 had been applied before its last edit.
        await conn.execute(
            "update supabase_migrations.schema_migrations set statements = array['-- older']"
            " where version = '20261122000700'"
        )
        lines: list[str] = []
        await migrations.apply_pending(conn, say=lines.append)
        warning = [line for line in lines if line.startswith("warning")]
        assert len(warning) == 1 and "20261122000700_batch_ledger" in warning[0], lines
        assert "update_request_logs_rls.py" in warning[0]
    finally:
        await conn.close()


async def test_partly_migrated_v0_database_is_refused_in_one_line(empty_db_url):
    conn = await asyncpg.connect(empty_db_url)
    try:
        await apply_v0(conn, skip=("20261122000900", "20261130000100"))
        with pytest.raises(migrations.PartiallyMigrated) as refused:
            await migrations.apply_pending(conn)
        message = str(refused.value)
        assert "\n" not in message
        assert "10 of the 12" in message
        assert "20261122000900_release_reservation, 20261130000100_login_sessions" in message
        assert f"git archive {migrations.V0_COMMIT} | tar -x" in message
        versions = await conn.fetch("select version from supabase_migrations.schema_migrations")
        assert {r[0] for r in versions} <= set(migrations.V0)  # nothing recorded, nothing run
        assert (
            await conn.fetchval("select to_regprocedure('public.vtai_release(uuid,uuid)')") is None
        )
    finally:
        await conn.close()


async def test_v0_commit_holds_the_v0_files():
    """The commit PartiallyMigrated sends operators to has exactly tests/data/migrations_v0."""
    proc = await asyncio.create_subprocess_exec(
        "git",
        "ls-tree",
        "-r",
        "--format=%(path)",
        migrations.V0_COMMIT,
        "supabase/migrations/",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, f"git has no commit {migrations.V0_COMMIT} here"
    names = [Path(p).name for p in out.decode().split()]
    assert names == sorted(p.name for p in V0_DIR.glob("*.sql"))


# --- Checksums ------------------------------------------------------------------------------


async def test_changed_migration_file_is_refused_with_one_line(empty_db_url, tmp_path):
    directory = tmp_path / "migrations"
    shutil.copytree(migrations.MIGRATIONS_DIR, directory)
    conn = await asyncpg.connect(empty_db_url)
    try:
        await migrations.apply_pending(conn, directory)
        edited = directory / "20261121000200_baseline.sql"
        edited.write_text(edited.read_text() + "\n-- an edit after release\n")
        with pytest.raises(migrations.MigrationChanged) as refused:
            await migrations.apply_pending(conn, directory)
        assert "\n" not in str(refused.value)
        assert "20261121000200_baseline.sql changed after it was applied" in str(refused.value)
        assert [m.path.name for m, _ in await migrations.changed(conn, directory)] == [edited.name]
        # Line ends are not a change: a Windows checkout reads the same text.
        edited.write_bytes(
            (migrations.MIGRATIONS_DIR / edited.name).read_text().replace("\n", "\r\n").encode()
        )
        assert await migrations.apply_pending(conn, directory) == []
    finally:
        await conn.close()


async def test_start_up_refuses_a_database_whose_applied_file_changed(db_url, tmp_path):
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(
            "update supabase_migrations.schema_migrations set vtai_sha256 = repeat('0', 64)"
            " where version = '20261121000200'"
        )
    finally:
        await conn.close()
    with pytest.raises(DatabaseError) as refused:
        await Database(make_settings(db_url, tmp_path), pool_size=2).open()
    message = str(refused.value)
    assert "\n" not in message
    assert "supabase/migrations/20261121000200_baseline.sql changed after it was applied" in (
        message
    )


async def test_checksum_missing_is_recorded_on_first_sight(db_url):
    """`supabase db push` records no checksum: the file as it is then is trusted."""
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute("update supabase_migrations.schema_migrations set vtai_sha256 = null")
        lines: list[str] = []
        assert await migrations.apply_pending(conn, say=lines.append) == []
        assert any("recorded the checksum of" in line for line in lines), lines
        assert not await conn.fetchval(
            "select count(*) from supabase_migrations.schema_migrations where vtai_sha256 is null"
        )
    finally:
        await conn.close()


# --- One applier at a time ------------------------------------------------------------------


async def test_two_appliers_at_once_apply_each_file_once(empty_db_url):
    first, second = await asyncpg.connect(empty_db_url), await asyncpg.connect(empty_db_url)
    try:
        applied = await asyncio.gather(
            migrations.apply_pending(first), migrations.apply_pending(second)
        )
        files = len(migrations.discover()) + len(migrations.discover_functions())
        assert sorted(len(a) for a in applied) == [0, files]
        assert await first.fetchval(
            "select count(*) from supabase_migrations.schema_migrations"
        ) == len(migrations.discover())
        # The lock is released: a third run takes it and finds nothing to do.
        assert await migrations.apply_pending(second) == []
        assert not await first.fetchval(
            "select count(*) from pg_locks where locktype = 'advisory'"
            " and database = (select oid from pg_database where datname = current_database())"
        )
    finally:
        await first.close()
        await second.close()


async def test_legacy_upgrade_says_how_many_rows_and_how_long_first(empty_db_url):
    from tests.test_legacy_migration import LEGACY_A  # it imports this module

    conn = await asyncpg.connect(empty_db_url)
    try:
        await conn.execute(migrations.discover()[0].sql)  # the auth schema Supabase has
        await conn.execute(LEGACY_A)
        lines: list[str] = []
        await migrations.apply_pending(conn, say=lines.append)
        assert "upgrading legacy public.request_logs in place: 5 row(s), about 1 s" in lines
        assert "usage_aggregates: bucketing 5 ledger row(s), about 1 s" in lines
        assert not any("skipping" in line for line in lines), lines
        assert await conn.fetch("select * from vtai_verify_aggregates()") == []
        # Run again, there is nothing to bucket.
        backfill = next(m for m in migrations.discover() if m.name == "legacy_backfill")
        await conn.execute(backfill.sql)
        assert await conn.fetch("select * from vtai_verify_aggregates()") == []
    finally:
        await conn.close()


# --- Function files, and the baseline they were moved out of -----------------------------------

BASELINE_V1 = Path(__file__).resolve().parents[1] / "data" / "baseline_v1"


def test_the_baseline_as_first_released_is_the_one_accepted():
    """The one deliberate edit of an applied file: the money functions left the baseline for
    supabase/migrations/functions/. The runner accepts the earlier text, and only that."""
    (old,) = migrations.discover(BASELINE_V1)
    assert old.sha256 in migrations.EARLIER_SHA256[old.version]
    assert "function public.vtai_reserve" in old.sql
    now = next(m for m in migrations.discover() if m.version == old.version)
    assert "function public.vtai_reserve" not in now.sql


async def test_database_on_the_first_baseline_upgrades_to_the_function_files(
    empty_db_url, tmp_path
):
    earlier = tmp_path / "migrations"
    earlier.mkdir()
    for m in migrations.discover():
        if m.version < "20261205000000":
            source = BASELINE_V1 / m.path.name if m.version == "20261121000200" else m.path
            shutil.copy(source, earlier / m.path.name)
    conn = await asyncpg.connect(empty_db_url)
    try:
        await migrations.apply_pending(conn, earlier, functions=tmp_path / "none")
        old_args = await conn.fetchval(
            "select pg_get_function_identity_arguments('public.vtai_reserve'::regproc)"
        )
        assert "p_model" not in old_args
        applied = await migrations.apply_pending(conn)
        assert [m.label for m in applied] == [
            *(m.label for m in migrations.discover() if m.version >= "20261205000000"),
            *(f.label for f in migrations.discover_functions()),
        ]
        assert await migrations.changed(conn) == []
        assert await migrations.stale_functions(conn) == []
        # One vtai_reserve, the new one: the old signature is gone.
        rows = await conn.fetch(
            "select pg_get_function_identity_arguments(p.oid) as args from pg_proc p"
            " where p.proname = 'vtai_reserve'"
        )
        assert len(rows) == 1 and "p_model" in rows[0]["args"]
    finally:
        await conn.close()


async def test_a_changed_function_file_is_applied_again_and_only_then(empty_db_url, tmp_path):
    functions = tmp_path / "functions"
    shutil.copytree(migrations.FUNCTIONS_DIR, functions)
    conn = await asyncpg.connect(empty_db_url)
    try:
        await migrations.apply_pending(conn, functions=functions)
        assert await migrations.apply_pending(conn, functions=functions) == []
        edited = functions / migrations.discover_functions()[0].name
        edited.write_text(
            edited.read_text()
            + "\ncomment on function public.vtai_record(jsonb, text) is 'edited';\n"
        )
        assert [f.name for f in await migrations.stale_functions(conn, functions)] == [edited.name]
        applied = await migrations.apply_pending(conn, functions=functions)
        assert [m.label for m in applied] == [f"function file {edited.name}"]
        assert (
            await conn.fetchval(
                "select obj_description('public.vtai_record(jsonb, text)'::regprocedure)"
            )
            == "edited"
        )
        assert await migrations.stale_functions(conn, functions) == []
    finally:
        await conn.close()


async def test_an_older_build_does_not_put_older_rules_back(empty_db_url, tmp_path):
    functions = tmp_path / "functions"
    shutil.copytree(migrations.FUNCTIONS_DIR, functions)
    conn = await asyncpg.connect(empty_db_url)
    try:
        await migrations.apply_pending(conn, functions=functions)
        newest = migrations.discover_functions(functions)[0]
        # A newer build applied this file at a higher version; this build's copy is older.
        await conn.execute(
            f"update {migrations.FUNCTIONS_TABLE} set version = $2, sha256 = 'newer'"
            " where name = $1",
            newest.name,
            newest.version + 1,
        )
        with pytest.raises(migrations.FunctionsNewer) as refused:
            await migrations.apply_pending(conn, functions=functions)
        assert f"{newest.name} (version {newest.version + 1} applied" in str(refused.value)
        assert "start the newer build" in str(refused.value)
    finally:
        await conn.close()


def test_every_function_file_says_its_version():
    assert all(f.version >= 1 for f in migrations.discover_functions())
