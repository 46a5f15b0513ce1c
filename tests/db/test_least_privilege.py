"""The app's connections to its embedded database use a role that is no superuser.

On Supabase the app's `postgres` is not a superuser; the embedded database now matches that:
migrations run as the superuser, everything the app does at run time as `vtai_app`.
"""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.browser import ROOT, browser_page, login, running_app, send
from tests.conftest import add_user
from tests.fake_provider import ANSWER, FakeProvider
from vtai.db import embedded as embedded_pg
from vtai.db import migrations
from vtai.db.connection import Database
from vtai.settings import Settings

PASSWORD = "correct horse battery"


@pytest.fixture
def data_dir(tmp_path):
    path = tmp_path / "data"
    yield path
    embedded_pg.stop_server(path)


def embedded_settings(data_dir: Path) -> Settings:
    return Settings(database_url=None, data_dir=data_dir, model="local/smollm2-135m")


async def whoami(conn) -> tuple[str, bool, str]:
    row = await conn.fetchrow(
        "select current_user as name, current_setting('is_superuser') as su,"
        " (select rolsuper from pg_roles where rolname = current_user) as rolsuper"
    )
    return row["name"], row["rolsuper"], row["su"]


async def app_connections(admin_url: str) -> set[str]:
    """The users of every client connection to the app's database but this one."""
    conn = await asyncpg.connect(admin_url)
    try:
        rows = await conn.fetch(
            "select distinct usename from pg_stat_activity where datname = current_database()"
            " and backend_type = 'client backend' and pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    return {r["usename"] for r in rows}


@pytest.mark.browser
async def test_app_does_not_connect_to_embedded_db_as_superuser(data_dir):
    """A metered turn, the chat history and /admin, through the running server, with every
    connection the app holds being `vtai_app`, which is no superuser."""
    provider = FakeProvider().start()
    env = {
        # With running_app's VTAI_DATABASE_URL empty, the app starts the embedded server in
        # data_dir, as `make run` does.
        "SUPABASE_DB_URL": "",
        "VTAI_MODEL": "openai/fake",
        "OPENAI_API_BASE": provider.url("ok"),
        "OPENAI_BASE_URL": provider.url("ok"),
        "OPENAI_API_KEY": "sk-test-not-a-real-key",
        "VTAI_REQUEST_TIMEOUT": "10",
    }
    data_dir.mkdir(parents=True)
    try:
        async with running_app("", data_dir, **env) as base:
            pg = embedded_pg.start(data_dir)  # attaches to the app's server
            assert not pg.owned
            admin = await asyncpg.connect(pg.admin_url)
            try:
                user = await add_user(admin, "lp_user")
                await add_user(admin, "lp_admin", tier="unlimited", admin=True)
            finally:
                await admin.close()

            async with browser_page() as page:
                await login(page, base, "lp_user")
                answer = await send(page, "Hello there.")
            assert ANSWER.split(".")[0] in answer and "tokens used" in answer

            # /admin's queries, as an administrator, over HTTP.
            async with httpx.AsyncClient(base_url=base, headers={"Origin": base}) as http:
                r = await http.post("/login", data={"username": "lp_admin", "password": PASSWORD})
                assert r.status_code == 200
                for path in (
                    "/admin/api/summary",
                    "/admin/api/series",
                    "/admin/api/users",
                    "/admin/api/logs",
                    "/admin/api/logs.csv",
                    "/admin/api/feedback",
                    "/admin/api/balances",
                ):
                    r = await http.get(path)
                    assert r.status_code == 200, (path, r.status_code, r.text[:200])
                r = await http.post(f"/admin/api/users/{user.id}/tier", json={"tier": "basic"})
                assert r.status_code == 200, r.text[:200]

            # What the turn and /admin wrote (read as the superuser, while the app runs).
            conn = await asyncpg.connect(pg.admin_url)
            try:
                for _ in range(100):  # the ledger row lands just after the answer
                    row = await conn.fetchrow(
                        "select status, total_tokens from request_logs where end_user = $1", user.id
                    )
                    if row is not None:
                        break
                    await asyncio.sleep(0.1)
                counter = await conn.fetchrow(
                    "select used, reserved from usage_counters where end_user = $1", user.id
                )
                threads = await conn.fetchval(
                    'select count(*) from "Thread" where "userId" = $1', str(user.id)
                )
                tier = await conn.fetchval("select tier from profiles where id = $1", user.id)
            finally:
                await conn.close()
            assert row["status"] == "success" and row["total_tokens"] > 0
            assert counter["used"] == row["total_tokens"]  # (a next turn may be reserved ahead)
            assert threads == 1 and tier == "basic"
            # Every connection the app holds (its pools, the gate's, chat history's).
            assert await app_connections(pg.admin_url) == {embedded_pg.APP_ROLE}
            conn = await asyncpg.connect(pg.app_url)
            try:
                assert await whoami(conn) == (embedded_pg.APP_ROLE, False, "off")
            finally:
                await conn.close()

    finally:
        provider.stop()


async def test_app_role_can_do_the_apps_work_and_nothing_more(data_dir):
    db = await Database(embedded_settings(data_dir), pool_size=2).open()
    try:
        async with db.pool.acquire() as conn:
            assert await whoami(conn) == (embedded_pg.APP_ROLE, False, "off")
            role = await conn.fetchrow(
                "select rolcreaterole, rolcreatedb, rolreplication, rolbypassrls"
                " from pg_roles where rolname = current_user"
            )
            assert dict(role) == {
                "rolcreaterole": False,
                "rolcreatedb": False,
                "rolreplication": False,
                "rolbypassrls": True,  # as the tables' owner: it serves every user
            }
            # It owns nothing and belongs to no role (no pg_read_server_files and the like).
            assert (
                await conn.fetchval(
                    "select count(*) from pg_class where relowner = (select oid from pg_roles"
                    " where rolname = current_user)"
                )
                == 0
            )
            assert (
                await conn.fetchval(
                    "select count(*) from pg_auth_members where member ="
                    " (select oid from pg_roles where rolname = current_user)"
                )
                == 0
            )
            # What the app does works: accounts (with their hashes), metering, history.
            await add_user(conn, "worker")
            assert await conn.fetchval("select count(*) from vtai_private.credentials") == 1
            user_id = await conn.fetchval("select id from profiles where username = 'worker'")
            granted = await conn.fetchrow(
                "select * from vtai_reserve($1, 10, 10, 'month', 900, now())", user_id
            )
            assert granted["granted"]
            assert (
                await conn.fetchval("select vtai_release($1, $2)", granted[2], user_id) is not None
            )
            assert await conn.fetch("select * from vtai_verify_counters()") == []
            # What it must not do.
            for sql in (
                "create table public.intruder (id int)",
                "alter table public.profiles add column x int",
                "drop table public.request_logs",
                "create role intruder",
                "create database intruder",
                "alter role current_user superuser",
                "copy (select 1) to program 'true'",
                "select pg_read_file('PG_VERSION')",
                "create schema intruder",
                "truncate public.request_logs",
            ):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute(sql)
    finally:
        await db.close()


async def test_existing_data_dir_gets_the_app_role_on_next_start(data_dir):
    """A data dir from before the app role: migrated and used as the superuser only."""
    pg = embedded_pg.start(data_dir)
    conn = await asyncpg.connect(pg.admin_url)
    try:
        await migrations.apply_pending(conn)
        await add_user(conn, "old_timer")
        await conn.execute(f"drop role if exists {embedded_pg.APP_ROLE}")
    finally:
        await conn.close()
    pg.stop()
    (data_dir / "pg-app-password").unlink()
    (data_dir / ".gitignore").unlink()

    db = await Database(embedded_settings(data_dir), pool_size=2).open()
    try:
        async with db.pool.acquire() as conn:
            assert await whoami(conn) == (embedded_pg.APP_ROLE, False, "off")
            # It sees the rows the superuser wrote (RLS does not hide them from the app).
            assert await conn.fetchval("select count(*) from profiles") == 1
    finally:
        await db.close()
    mode = stat.S_IMODE((data_dir / "pg-app-password").stat().st_mode)
    assert mode == 0o600
    assert (data_dir / ".gitignore").read_text().splitlines()[-1] == "*"


async def test_a_widened_or_repassworded_app_role_is_put_back(data_dir):
    db = await Database(embedded_settings(data_dir), pool_size=1).open(migrate=True)
    admin_url = db.admin_url
    await db.close_pools()
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f"alter role {embedded_pg.APP_ROLE} superuser createdb password 'x'")
    finally:
        await conn.close()
    db2 = await Database(embedded_settings(data_dir), pool_size=1).open(migrate=False)
    try:
        async with db2.pool.acquire() as conn:
            assert await whoami(conn) == (embedded_pg.APP_ROLE, False, "off")
            assert not await conn.fetchval(
                "select rolcreatedb from pg_roles where rolname = current_user"
            )
    finally:
        await db2.close()
        await db.close()


def test_scram_verifier_matches_what_postgres_checks():
    verifier = embedded_pg.scram_verifier("s3cret", salt=b"0123456789abcdef")
    assert verifier.startswith("SCRAM-SHA-256$4096:")
    assert embedded_pg.scram_matches(verifier, "s3cret")
    assert not embedded_pg.scram_matches(verifier, "other")
    assert not embedded_pg.scram_matches(None, "s3cret")
    assert not embedded_pg.scram_matches("md5abc", "s3cret")


async def test_concurrent_starts_prepare_the_role_once(data_dir):
    """Two processes opening the same fresh data dir at once (the app and a `vtai` command)."""
    await (await Database(embedded_settings(data_dir), pool_size=1).open()).close_pools()
    script = (
        "import asyncio, sys; from pathlib import Path;"
        "from vtai.db.connection import Database; from vtai.settings import Settings\n"
        "async def go():\n"
        "    s = Settings(database_url=None, data_dir=Path(sys.argv[1]), model='local/x')\n"
        "    db = await Database(s, pool_size=1).open()\n"
        "    async with db.pool.acquire() as c: print(await c.fetchval('select current_user'))\n"
        "    await db.close_pools()\n"
        "asyncio.run(go())\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(data_dir)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [await asyncio.to_thread(p.communicate, timeout=120) for p in procs]
    for (out, err), p in zip(results, procs, strict=True):
        assert p.returncode == 0, err[-2000:]
        assert out.strip() == embedded_pg.APP_ROLE


def test_cli_works_as_the_app_role(data_dir):
    env = dict(os.environ, VTAI_DATA_DIR=str(data_dir), VTAI_DATABASE_URL="", SUPABASE_DB_URL="")
    env.pop("SUPABASE_URL", None)
    vtai = [sys.executable, "-m", "vtai.cli"]
    name = f"cli{uuid.uuid4().hex[:6]}"

    def run(*args: str, stdin: str | None = None) -> str:
        r = subprocess.run(
            [*vtai, *args], env=env, input=stdin, capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0, (args, r.stdout, r.stderr)
        return r.stdout

    run("user", "add", name, "--tier", "basic", "--password-stdin", stdin="pw-for-cli\n")
    run("user", "tier", name, "premium")
    run("user", "password", name, "--password-stdin", stdin="pw-changed\n")
    assert name in run("user", "list")
    run("usage", name)
    run("usage", "--verify")
    run("spool", "status")
