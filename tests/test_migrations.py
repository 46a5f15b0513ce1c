"""Migrations on an empty database, on re-runs, and as a non-superuser on a Supabase-shaped one."""

from __future__ import annotations

import asyncpg
import pytest

from tests.conftest import create_database, drop_database, with_database
from vtai import migrations

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


@pytest.fixture
async def supabase_db(pg_server):
    """(superuser URL, migrator URL) of a fresh database shaped like a Supabase project."""
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
    migrator_url = f"postgresql://{MIGRATOR}:{MIGRATOR_PASSWORD}@{parts}"
    yield url, migrator_url
    await drop_database(pg_server, url)


async def test_migrations_apply_on_empty_database_and_rerun_is_noop(empty_db_url):
    conn = await asyncpg.connect(empty_db_url)
    try:
        applied = await migrations.apply_pending(conn)
        assert [m.version for m in applied] == [m.version for m in migrations.discover()]
        recorded = await conn.fetch(
            "select version, name from supabase_migrations.schema_migrations order by version"
        )
        assert [(r["version"], r["name"]) for r in recorded] == [
            (m.version, m.name) for m in migrations.discover()
        ]
        assert await migrations.apply_pending(conn) == []
        # Every migration is also safe to run again by hand (idempotent where Postgres allows).
        for m in migrations.discover():
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
        # Default privileges granted anon ALL; the migrations took every bit of it back.
        for table in ("profiles", "tiers", "request_logs", "usage_counters", "reservations"):
            for role in ("anon",):
                for priv in ("select", "insert", "update", "delete"):
                    assert not await su.fetchval(
                        "select has_table_privilege($1, $2, $3)", role, f"public.{table}", priv
                    ), (role, table, priv)
        for fn in (
            "vtai_reserve(uuid,integer,integer,text,integer,timestamptz)",
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
