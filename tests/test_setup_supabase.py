"""scripts/setup_supabase.py and scripts/update_request_logs_rls.py, run as operators run them."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import pytest

from tests.conftest import ROOT, embedded_server
from tests.db import test_migrations as test_migrations
from vtai.db import migrations

# A database shaped like hosted Supabase, migrated by a non-superuser (a shared fixture).
supabase_db = test_migrations.supabase_db


def script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, f"scripts/{name}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def setup(*args: str) -> subprocess.CompletedProcess:
    return script("setup_supabase.py", *args)


async def test_setup_on_empty_database_then_second_run_changes_nothing(empty_db_url):
    first = setup("--db-url", empty_db_url)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "applied migration 20261121000200_baseline" in first.stdout
    assert "FAIL" not in first.stdout and "all checks passed" in first.stdout
    for line in ("row-level security on vtai_private.credentials", "authenticated can't execute"):
        assert line in first.stdout

    second = setup("--db-url", empty_db_url)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "migrations: none pending" in second.stdout
    assert "changes: none" in second.stdout

    check = setup("--db-url", empty_db_url, "--check")
    assert check.returncode == 0 and "changes:" not in check.stdout
    assert setup("--db-url", empty_db_url, "--print-sql").stdout.count("begin;") == 0


async def test_check_detects_policy_drift_and_rls_script_repairs_it(empty_db_url):
    assert setup("--db-url", empty_db_url).returncode == 0
    conn = await asyncpg.connect(empty_db_url)
    try:
        await conn.execute('drop policy "request_logs: users read their own" on request_logs')
        dropped = setup("--db-url", empty_db_url, "--check")
        assert dropped.returncode == 1
        assert (
            'FAIL  policy "request_logs: users read their own" on public.request_logs: missing'
            in (dropped.stdout)
        )

        await conn.execute(
            'create policy "Allow all inserts to request_logs" on request_logs'
            " for insert with check (true)"
        )
        await conn.execute(
            'create policy "whoever" on usage_counters for select to anon using (true)'
        )
        permissive = setup("--db-url", empty_db_url, "--check")
        assert permissive.returncode == 1
        assert 'unexpected policy "Allow all inserts to request_logs"' in permissive.stdout
        assert 'unexpected policy "whoever" on public.usage_counters' in permissive.stdout

        dry = script("update_request_logs_rls.py", "--db-url", empty_db_url, "--dry-run")
        assert dry.returncode == 0 and "would drop policy" in dry.stdout
        assert setup("--db-url", empty_db_url, "--check").returncode == 1

        fixed = script("update_request_logs_rls.py", "--db-url", empty_db_url)
        assert fixed.returncode == 0, fixed.stderr
        assert 'drop policy "Allow all inserts to request_logs"' in fixed.stdout
        assert 'drop policy "whoever" on public.usage_counters' in fixed.stdout
        assert 'create policy "request_logs: users read their own"' in fixed.stdout
        assert setup("--db-url", empty_db_url, "--check").returncode == 0
        again = script("update_request_logs_rls.py", "--db-url", empty_db_url)
        assert "policies: already as the migrations define them" in again.stdout
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def password_server(request):
    """A Postgres that checks passwords: the embedded one (initdb --auth=scram-sha-256).

    A server named by VTAI_TEST_DATABASE_URL may trust everyone (CI's does), so then the test
    starts an embedded server of its own.
    """
    if not os.environ.get("VTAI_TEST_DATABASE_URL"):
        yield request.getfixturevalue("pg_server")
        return
    with embedded_server("vtai-test-pw-pg-") as url:
        yield url


@pytest.mark.db
async def test_bad_password_is_one_line_without_the_password(password_server):
    role, secret = f"vtai_pw_{uuid.uuid4().hex[:8]}", "the-right-one-7f3a"
    admin = await asyncpg.connect(password_server)
    try:
        await admin.execute(f"create role {role} login password '{secret}'")
        parts = urlsplit(password_server)
        wrong = "hunter2-wrong-9c1e"
        netloc = f"{role}:{quote(wrong)}@{parts.hostname}:{parts.port}"
        result = setup("--db-url", urlunsplit(parts._replace(netloc=netloc)))
    finally:
        await admin.execute(f"drop role if exists {role}")
        await admin.close()
    assert result.returncode == 3 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "rejected the user or password" in lines[0], result.stderr
    assert wrong not in result.stderr and secret not in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_host_is_one_line_without_the_password():
    result = setup("--db-url", "postgresql://postgres:hunter2-secret@127.0.0.1:1/postgres")
    assert result.returncode == 3
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the database at 127.0.0.1" in lines[0]
    assert "hunter2" not in result.stderr and "Traceback" not in result.stderr


async def test_missing_database_and_missing_url_are_one_line(empty_db_url):
    missing = setup("--db-url", empty_db_url + "_nope")
    assert missing.returncode == 3
    assert len(missing.stderr.strip().splitlines()) == 1 and "does not exist" in missing.stderr

    if not (ROOT / ".env").exists():
        no_url = subprocess.run(
            [sys.executable, "scripts/setup_supabase.py", "--check"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin"},
        )
        assert no_url.returncode == 2 and "no database URL" in no_url.stderr


def test_print_sql_all_needs_no_database_and_help_documents_exit_codes():
    out = setup("--print-sql", "--all").stdout
    assert "-- 20261121000100_legacy_request_logs.sql" in out
    assert "insert into supabase_migrations.schema_migrations" in out
    assert "exit codes:" in setup("--help").stdout


async def test_migrations_as_non_superuser_pass_every_check(supabase_db):
    _, migrator_url = supabase_db
    result = setup("--db-url", migrator_url)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_check_names_a_migration_file_changed_after_it_was_applied(db_url):
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(
            "update supabase_migrations.schema_migrations set vtai_sha256 = repeat('0', 64)"
            " where version = '20261121000300'"
        )
    finally:
        await conn.close()
    check = setup("--db-url", db_url, "--check")
    assert check.returncode == 1
    fails = [line for line in check.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 1, check.stdout
    assert (
        "supabase/migrations/20261121000300_chat_history.sql changed after it was applied"
        in (fails[0])
    )
    applying = setup("--db-url", db_url)
    assert applying.returncode == 3 and applying.stdout == ""
    lines = applying.stderr.strip().splitlines()
    assert len(lines) == 1 and "20261121000300_chat_history.sql changed after" in lines[0]


async def test_database_from_before_the_baseline_with_check_print_sql_and_setup(empty_db_url):
    conn = await asyncpg.connect(empty_db_url)
    try:
        await test_migrations.apply_v0(conn)
        check = setup("--db-url", empty_db_url, "--check")
        assert check.returncode == 1
        assert "migrated with the files before the schema baseline" in check.stdout
        assert "FAIL  usage counters" not in check.stdout

        # The editor's SQL moves it onto the baseline just as setup would.
        script_sql = setup("--db-url", empty_db_url, "--print-sql")
        assert script_sql.returncode == 0, script_sql.stderr
        assert script_sql.stdout.count("\nbegin;") == 1 + len(
            [m for m in migrations.discover() if m.version > max(migrations.BASELINE)]
        ) + len(migrations.discover_functions())
        await conn.execute(script_sql.stdout)
        assert await migrations.pending(conn) == []
        assert await conn.fetchval(f"select count(*) from {migrations.REPLACED_TABLE}") == 12
        again = setup("--db-url", empty_db_url)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "migrations: none pending" in again.stdout and "all checks passed" in again.stdout
    finally:
        await conn.close()


async def test_setup_moves_a_database_from_before_the_baseline(empty_db_url):
    conn = await asyncpg.connect(empty_db_url)
    try:
        await test_migrations.apply_v0(conn, skip=("20261122000150",))
        partial = setup("--db-url", empty_db_url)
        assert partial.returncode == 3
        lines = partial.stderr.strip().splitlines()
        assert len(lines) == 1 and "11 of the 12" in lines[0], partial.stderr
        assert "20261122000150_legacy_request_logs" in lines[0]
        assert "FAIL  migrations applied: this database has 11 of the 12" in (
            setup("--db-url", empty_db_url, "--check").stdout
        )
        assert setup("--db-url", empty_db_url, "--print-sql").returncode == 3

        await conn.execute(
            (test_migrations.V0_DIR / "20261122000150_legacy_request_logs.sql").read_text()
        )
        await conn.execute(
            "insert into supabase_migrations.schema_migrations (version, name)"
            " values ('20261122000150', 'legacy_request_logs')"
        )
        moved = setup("--db-url", empty_db_url)
        assert moved.returncode == 0, moved.stdout + moved.stderr
        assert "note  this database was migrated with the 12 files before" in moved.stdout
        assert "all checks passed" in moved.stdout
    finally:
        await conn.close()
