"""The embedded PostgreSQL: real servers in temporary data dirs, no mocks."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import pytest

from vtai.db import embedded as embedded_pg
from vtai.db.embedded import EmbeddedPostgresError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def data_dir(tmp_path):
    path = tmp_path / "vtai"
    yield path
    # Whatever a test left running (also servers that other processes started) must go.
    embedded_pg.stop_server(path)


def fetch(url: str, sql: str):
    async def go():
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    return asyncio.run(go())


def execute(url: str, sql: str) -> None:
    async def go():
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(go())


def kill_postmaster(pid: int) -> None:
    """SIGKILL the postmaster and wait until it is dead (a zombie counts: nobody may reap it)."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        except OSError:  # no procfs
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            state = "R"
        if state in ("Z", "X"):
            return
        time.sleep(0.02)
    raise AssertionError(f"postmaster {pid} survived SIGKILL")


def test_first_start_creates_cluster(data_dir):
    began = time.monotonic()
    pg = embedded_pg.start(data_dir)
    first_start = time.monotonic() - began
    try:
        assert pg.owned
        assert pg.pid > 0
        assert pg.url == (f"postgresql://postgres:{pg.password}@127.0.0.1:{pg.port}/vtai")
        assert fetch(pg.url, "select version()").startswith("PostgreSQL 18")
        assert fetch(pg.url, "select current_database()") == "vtai"
        assert fetch(pg.url, "show server_encoding") == "UTF8"
        assert fetch(pg.url, "show listen_addresses") == "127.0.0.1"
        assert fetch(pg.url, "show password_encryption") == "scram-sha-256"
        assert fetch(pg.url, "show max_connections") == "200"

        password_file = data_dir / "pg-password"
        assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
        assert password_file.read_text().strip() == pg.password
        # The app's role has a password of its own, as private, and another URL.
        app_password_file = data_dir / "pg-app-password"
        assert stat.S_IMODE(app_password_file.stat().st_mode) == 0o600
        assert app_password_file.read_text().strip() == pg.app_password != pg.password
        assert pg.admin_url == pg.url
        assert pg.app_url == (f"postgresql://vtai_app:{pg.app_password}@127.0.0.1:{pg.port}/vtai")
        assert stat.S_IMODE(data_dir.stat().st_mode) & 0o077 in (0, 0o001)  # o+x at most
        assert (data_dir / ".gitignore").read_text().splitlines()[-1] == "*"
        if os.geteuid() == 0:
            # The server runs as a normal user; only root can read the password.
            assert password_file.stat().st_uid == 0
            assert (data_dir / "pg").stat().st_uid != 0
            assert Path(f"/proc/{pg.pid}").stat().st_uid == (data_dir / "pg").stat().st_uid

        bad = pg.url.replace(pg.password, "wrong")
        with pytest.raises(asyncpg.InvalidPasswordError):
            fetch(bad, "select 1")
    finally:
        pg.stop()
    assert not pg.is_running()
    assert not (data_dir / "pg" / "postmaster.pid").exists()
    pg.stop()  # idempotent
    print(f"first start (initdb + start): {first_start:.2f}s")


def test_restart_keeps_data_and_port(data_dir):
    pg = embedded_pg.start(data_dir)
    execute(pg.url, "create table notes (body text); insert into notes values ('kept')")
    password, port = pg.password, pg.port
    pg.stop()

    began = time.monotonic()
    pg = embedded_pg.start(data_dir)
    restart = time.monotonic() - began
    assert pg.owned
    assert (pg.password, pg.port) == (password, port)  # same URL as before
    assert fetch(pg.url, "select body from notes") == "kept"
    assert restart < 5, restart
    pg.stop()

    # A port taken in the meantime: the server moves to another one.
    with socket.socket() as squatter:
        # Connections of the stopped server linger in TIME_WAIT on that port.
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        pg = embedded_pg.start(data_dir)
        assert pg.port != port
        assert fetch(pg.url, "select body from notes") == "kept"
        pg.stop()
    print(f"restart: {restart:.2f}s")


def test_second_start_attaches_without_owning(data_dir):
    first = embedded_pg.start(data_dir)
    second = embedded_pg.start(data_dir)
    assert first.owned and not second.owned
    assert second.pid == first.pid
    assert second.url == first.url
    assert fetch(second.url, "select 1") == 1

    second.stop()  # not ours to stop
    assert first.is_running()
    assert fetch(first.url, "select 1") == 1

    first.stop()
    assert not first.is_running()


def test_recovers_after_sigkill(data_dir):
    pg = embedded_pg.start(data_dir)
    execute(pg.url, "create table t (n int); insert into t select generate_series(1, 1000)")
    old_pid = pg.pid

    kill_postmaster(old_pid)
    assert not pg.is_running()
    pg = embedded_pg.start(data_dir)
    assert pg.owned and pg.pid != old_pid
    assert fetch(pg.url, "select count(*) from t") == 1000

    # restart() also works straight after the kill, without waiting for the process to die.
    url = pg.url
    os.kill(pg.pid, signal.SIGKILL)
    pg.restart()
    assert pg.owned and pg.url == url
    assert fetch(pg.url, "select sum(n) from t") == 500500
    pg.stop()
    assert not pg.is_running()


STARTER = """
import asyncio, json, sys, time
from pathlib import Path
import asyncpg
from vtai.db import embedded as embedded_pg

time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
pg = embedded_pg.start(Path(sys.argv[1]))

async def port():
    conn = await asyncpg.connect(pg.url)
    try:
        return await conn.fetchval("select inet_server_port()")
    finally:
        await conn.close()

print(json.dumps({"owned": pg.owned, "pid": pg.pid, "port": pg.port, "seen": asyncio.run(port())}))
"""


@pytest.mark.slow
def test_concurrent_starts_share_one_server(data_dir):
    # Both processes wait for the same moment, so they race for the cluster's first creation.
    go = str(time.time() + 1.5)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", STARTER, str(data_dir), go],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for _ in range(2)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        results.append(json.loads(out))

    assert sorted(r["owned"] for r in results) == [False, True]
    assert len({r["pid"] for r in results}) == 1
    assert all(r["seen"] == r["port"] == results[0]["port"] for r in results)
    # The server outlives the process that started it (nobody called stop()).
    assert embedded_pg.start(data_dir).pid == results[0]["pid"]


def test_errors_are_one_line(data_dir):
    (data_dir / "pg").mkdir(parents=True)
    (data_dir / "pg" / "junk").write_text("not a cluster")
    with pytest.raises(EmbeddedPostgresError) as err:
        embedded_pg.start(data_dir)
    message = str(err.value)
    assert "\n" not in message
    assert "not a PostgreSQL data directory" in message


NON_ROOT_RUN = """
import asyncio, json, os, signal, sys
from pathlib import Path
import asyncpg
from vtai.db import embedded as embedded_pg

async def answer(url):
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval("select 42")
    finally:
        await conn.close()

pg = embedded_pg.start(Path(sys.argv[1]))
server_uid = Path(f"/proc/{pg.pid}").stat().st_uid
os.kill(pg.pid, signal.SIGKILL)
pg.restart()
answer = asyncio.run(answer(pg.url))
pg.stop()
print(json.dumps({"uid": os.geteuid(), "server_uid": server_uid, "answer": answer,
                  "running": pg.is_running()}))
"""


def _python_for(user: pwd.struct_passwd) -> str | None:
    # The venv's interpreter may sit under /root, out of a normal user's reach.
    for python in (sys.executable, "/usr/bin/python3"):
        try:
            check = subprocess.run(
                [python, "-c", "import sys; print(sys.version_info[:2])"],
                capture_output=True,
                text=True,
                user=user.pw_uid,
                group=user.pw_gid,
                extra_groups=[],
                cwd="/",
            )
        except OSError:
            continue
        if check.returncode == 0 and check.stdout.strip() == str(sys.version_info[:2]):
            return python
    return None


def _nobody():
    """(user, python) for the unprivileged 'nobody', or None where that can't run here."""
    if os.geteuid() != 0:
        return None  # the other tests already run as a normal user
    try:
        user = pwd.getpwnam("nobody")
    except KeyError:
        return None
    python = _python_for(user)
    return (user, python) if python else None


NOBODY = _nobody()


@pytest.mark.slow
@pytest.mark.skipif(NOBODY is None, reason="needs root and a 'nobody' user that can run Python")
def test_works_as_a_normal_user():
    user, python = NOBODY
    site_packages = Path(asyncpg.__file__).resolve().parent.parent
    home = Path(tempfile.mkdtemp(prefix="vtai-nobody-"))
    os.chown(home, user.pw_uid, user.pw_gid)
    data_dir = home / "data"
    try:
        result = subprocess.run(
            [python, "-c", NON_ROOT_RUN, str(data_dir)],
            capture_output=True,
            text=True,
            user=user.pw_uid,
            group=user.pw_gid,
            extra_groups=[],
            cwd="/",
            env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": f"{ROOT}:{site_packages}"},
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report == {
            "uid": user.pw_uid,
            "server_uid": user.pw_uid,
            "answer": 42,
            "running": False,
        }
        assert (data_dir / "pg").stat().st_uid == user.pw_uid
    finally:
        embedded_pg.stop_server(data_dir)
        shutil.rmtree(home, ignore_errors=True)
