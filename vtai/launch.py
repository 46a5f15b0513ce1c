"""`make run`: prepare the data dir, database and first admin, then serve the Chainlit app.

Owns the embedded Postgres when it starts it, so Ctrl-C stops the app and then the database.
`--workers N` (`make run WORKERS=N`) serves N app processes behind HAProxy instead
(vtai.cluster.supervisor); the database is still started once, here, before them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

from vtai import datadir
from vtai.db import accounts
from vtai.db.connection import Database, DatabaseError
from vtai.settings import Settings, SettingsError, load_settings

APP = Path(__file__).resolve().parent / "main.py"


def ensure_auth_secret(data_dir: Path, settings: Settings | None = None) -> str:
    """CHAINLIT_AUTH_SECRET from the settings (default: read from the environment now), else
    one generated once into the data dir."""
    datadir.ensure(data_dir)
    configured = (
        settings if settings is not None else load_settings(dotenv=False)
    ).chainlit_auth_secret
    if configured is not None:
        return configured.get_secret_value()
    path = data_dir / "auth-secret"
    if path.exists():
        return path.read_text().strip()
    secret = secrets.token_urlsafe(48)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return secret


async def ensure_admin(db: Database, settings: Settings) -> str | None:
    """Create the first admin on a fresh database; returns its one-time password."""
    async with db.pool.acquire() as conn:
        if await accounts.any_admin(conn):
            return None
        given = settings.admin_password
        password = given.get_secret_value() if given else secrets.token_urlsafe(12)
        await accounts.create_user(conn, settings.admin_username, password, "unlimited", True)
        return password


async def prepare(settings: Settings) -> tuple[Database | None, str | None]:
    if settings.rest_metering:
        # Nothing to migrate or seed from here: the project's database is set up with
        # scripts/setup_supabase.py, and users sign in through Supabase Auth.
        return None, None
    db = await Database(settings, pool_size=2).open()
    # A local admin could never log in while logins go to Supabase Auth.
    password = None if settings.supabase_auth else await ensure_admin(db, settings)
    # The pools belong to this event loop; the server stays up until the app exits.
    await db.close_pools()
    return db, password


def _where(settings: Settings) -> str:
    if settings.rest_metering:
        return f"Supabase REST API at {urlsplit(settings.supabase_url).hostname}"
    if settings.embedded:
        return f"embedded Postgres in {settings.data_dir}"
    return "your DB"


_terminated = False


def _interrupt(signum, frame) -> None:
    global _terminated
    _terminated = True
    raise KeyboardInterrupt


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vtai.launch", description="make run")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="app processes; more than 1 puts HAProxy in front of them (docs/deploy.md)",
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: give 1 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    try:
        settings = load_settings()
        # Chainlit reads its secret from the environment: the `chainlit run` child's.
        os.environ["CHAINLIT_AUTH_SECRET"] = ensure_auth_secret(settings.data_dir, settings)
        db, password = asyncio.run(prepare(settings))
    except (SettingsError, DatabaseError) as exc:
        print(f"vtai: {exc}", file=sys.stderr)
        return 2
    host, port = settings.chainlit_host, str(settings.chainlit_port)
    behind = f"{args.workers} processes behind HAProxy, " if args.workers > 1 else ""
    print(f"\nVT.ai is starting on http://{host}:{port} ({behind}{_where(settings)}).")
    if settings.supabase_auth:
        print(
            "Log in with a Supabase Auth user's email and password. Make one an admin in the "
            "SQL editor: update public.profiles set is_admin = true where username = 'EMAIL';\n"
        )
    elif password:
        print(f"First run: log in as '{settings.admin_username}' with password: {password}")
        print(
            "This password is shown once. Change it: vtai user password "
            f"{settings.admin_username} --password-stdin\n"
        )
    else:
        print("Log in with an existing account (list them: .venv/bin/vtai user list).\n")
    sys.stdout.flush()
    env = dict(os.environ)
    # `chainlit run` reads CI=true as --ci and then plants a fake OPENAI_API_KEY.
    env.pop("CI", None)
    if args.workers > 1:
        return _serve_cluster(settings, args.workers, env, db)
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chainlit",
            "run",
            str(APP),
            "--headless",
            "--host",
            host,
            "--port",
            port,
        ],
        env=env,
    )
    # A service manager stops us with SIGTERM: shut down the same way as on Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return child.wait()
    except KeyboardInterrupt:
        # Ctrl-C in a terminal reached the child already; SIGTERM did not, so pass it on.
        child.send_signal(signal.SIGINT)
        try:
            return child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGTERM)
            return child.wait()
    finally:
        if db is not None:
            asyncio.run(db.close())
        if settings.embedded:
            print("Stopped the embedded database.")


def _serve_cluster(settings: Settings, workers: int, env: dict, db: Database | None) -> int:
    from vtai.cluster.supervisor import Supervisor

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        try:
            supervisor = Supervisor(settings, workers, APP, env)
        except RuntimeError as exc:
            print(f"vtai: {exc}", file=sys.stderr)
            return 2
        print(f"HAProxy's config: {supervisor.config_path}", flush=True)
        return supervisor.run(forwarded=lambda: _terminated)
    finally:
        # After every app process has stopped: they only connected to it.
        if db is not None:
            asyncio.run(db.close())
        if settings.embedded:
            print("Stopped the embedded database.")


if __name__ == "__main__":
    sys.exit(main())
