"""`make run`'s launcher: first run prints a one-time admin password, Ctrl-C stops the
embedded database cleanly, and a second run keeps the data."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.browser import ROOT, free_port
from vtai.launch import ensure_auth_secret

pytestmark = pytest.mark.slow


def launch(data_dir, port, log):
    # CI=true on purpose: the launcher must keep chainlit's --ci mode from faking a key.
    env = dict(
        os.environ,
        VTAI_DATA_DIR=str(data_dir),
        CHAINLIT_PORT=str(port),
        CI="true",
        PYTHONUNBUFFERED="1",
    )
    env.pop("VTAI_DATABASE_URL", None)
    env.pop("CHAINLIT_AUTH_SECRET", None)
    return subprocess.Popen(
        [sys.executable, "-m", "vtai.launch"],
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_for_login_page(proc, port, log, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError("launcher exited: " + log.read_text())
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=2) as r:
                if r.status == 200 and "available at" in log.read_text():
                    return log.read_text()
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError("app did not come up: " + log.read_text())


def ctrl_c(proc, log):
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does: the whole process group
    proc.wait(timeout=60)
    return log.read_text()


def postmaster_running(data_dir) -> bool:
    return (data_dir / "pg" / "postmaster.pid").exists()


def test_first_run_second_run_and_ctrl_c(tmp_path):
    data_dir = tmp_path / "data"
    port = free_port()
    log = tmp_path / "first.log"
    first = launch(data_dir, port, log)
    try:
        out = wait_for_login_page(first, port, log)
    finally:
        tail = ctrl_c(first, log)
    password = re.search(r"log in as 'admin' with password: (\S+)", out)
    assert password, out
    assert "Stopped the embedded database" in tail
    assert not postmaster_running(data_dir)
    assert oct((data_dir / "auth-secret").stat().st_mode & 0o777) == "0o600"

    log = tmp_path / "second.log"
    second = launch(data_dir, port, log)
    try:
        out = wait_for_login_page(second, port, log)
    finally:
        ctrl_c(second, log)
    assert "with password" not in out and "existing account" in out
    assert not postmaster_running(data_dir)


def test_sigterm_stops_app_and_database(tmp_path):
    data_dir = tmp_path / "data"
    port = free_port()
    log = tmp_path / "term.log"
    proc = launch(data_dir, port, log)
    try:
        wait_for_login_page(proc, port, log)
    finally:
        proc.terminate()  # SIGTERM to the launcher alone, as a service manager sends it
        proc.wait(timeout=60)
    assert "Stopped the embedded database" in log.read_text()
    assert not postmaster_running(data_dir)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=2)


def test_auth_secret_is_generated_once(tmp_path, monkeypatch):
    monkeypatch.delenv("CHAINLIT_AUTH_SECRET", raising=False)
    first = ensure_auth_secret(tmp_path)
    assert len(first) >= 32 and ensure_auth_secret(tmp_path) == first
    monkeypatch.setenv("CHAINLIT_AUTH_SECRET", "from-env")
    assert ensure_auth_secret(tmp_path) == "from-env"


def test_data_dir_inside_repo_is_ignored_by_git(tmp_path, monkeypatch):
    from vtai.db import embedded as embedded_pg

    repo = tmp_path / "checkout"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    monkeypatch.delenv("CHAINLIT_AUTH_SECRET", raising=False)
    # The two ways a data dir comes to be: the launcher's secret, and the embedded server.
    ensure_auth_secret(repo / "data")
    pg = embedded_pg.start(repo / "pgdata")
    try:
        status = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=all"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    finally:
        pg.stop()
    assert (repo / "data" / "auth-secret").exists() and (repo / "pgdata" / "pg-password").exists()
    assert status == ""
    # `git add -A` (or a forced look) still finds nothing to commit.
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
    staged = subprocess.run(
        ["git", "-C", str(repo), "diff", "--cached", "--name-only"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert staged == ""


def test_plain_chainlit_run_needs_no_setup_and_stops_its_database(tmp_path):
    """`chainlit run vtai/main.py` on a fresh clone: no secret, no account, no database URL."""
    data_dir = tmp_path / "data"
    port = free_port()
    log = tmp_path / "plain.log"
    env = dict(os.environ, VTAI_DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1")
    for name in ("VTAI_DATABASE_URL", "CHAINLIT_AUTH_SECRET", "CI"):
        env.pop(name, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "chainlit", "run", "vtai/main.py", "--headless"]
        + ["--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out = wait_for_login_page(proc, port, log)
        assert "no account yet" in out and "vtai user add admin --admin" in out
        # The hint works as printed: the account it makes can log in.
        subprocess.run(
            [sys.executable, "-m", "vtai.cli", "user", "add", "admin", "--admin"]
            + ["--tier", "unlimited", "--password-stdin"],
            input="a strong password here",
            text=True,
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        body = b"username=admin&password=a+strong+password+here"
        request = urllib.request.Request(f"http://127.0.0.1:{port}/login", data=body)
        with urllib.request.urlopen(request, timeout=10) as r:
            assert r.status == 200 and "access_token" in r.headers.get("set-cookie", "")
    finally:
        tail = ctrl_c(proc, log)
    assert oct((data_dir / "auth-secret").stat().st_mode & 0o777) == "0o600"
    assert "has stopped" in tail
    assert not postmaster_running(data_dir)
