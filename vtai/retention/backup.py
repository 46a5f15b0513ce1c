"""`vtai backup FILE` and `vtai restore FILE`: the embedded database, with the pg_dump and
pg_restore that ship next to its `postgres` binary (same major version, always).

A backup is pg_dump's custom format of the `vtai` database. A restore loads it into a new
database beside the live one and swaps the two only when it loaded completely, so a failed
restore leaves the database as it was. It refuses while anything else is connected (the app
is running: stop it first) and, without --force, when the database holds users or ledger rows.
With a database URL neither applies: the provider's backups, or pg_dump directly.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

from vtai.db import embedded
from vtai.db.connection import Database, connect

NOT_EMBEDDED = (
    "backup and restore are for the embedded database; with a database URL use your provider's"
    " backups (Supabase: Database > Backups) or pg_dump / pg_restore directly"
)


class BackupError(RuntimeError):
    """One line: what went wrong and what to do."""


def _tool(name: str) -> str:
    return str(embedded._bin_dir() / name)


def _env(pg: embedded.EmbeddedPostgres) -> dict[str, str]:
    # The password in the environment, not on the command line (ps shows arguments).
    return embedded._child_env() | {"PGPASSWORD": pg.password}


def _conn_args(pg: embedded.EmbeddedPostgres, database: str) -> list[str]:
    return ["-h", "127.0.0.1", "-p", str(pg.port), "-U", embedded.SUPERUSER, "-d", database]


def _run(cmd: list[str], pg: embedded.EmbeddedPostgres, what: str) -> None:
    result = subprocess.run(
        cmd, env=_env(pg), stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        tail = " ".join((result.stderr or result.stdout).split())[-300:]
        raise BackupError(f"{what} failed (exit {result.returncode}): {tail}")


def _start(settings) -> embedded.EmbeddedPostgres:
    try:
        return embedded.start(settings.data_dir)
    except embedded.EmbeddedPostgresError as exc:
        raise BackupError(str(exc)) from None


async def backup(settings, file: Path, say=print) -> int:
    """Dump the embedded database to `file`; its size in bytes."""
    file = Path(file)
    pg = await asyncio.to_thread(_start, settings)
    part = file.with_name(file.name + ".part")
    try:
        say(f"dumping the embedded database (port {pg.port}) to {file} ...")
        cmd = [_tool("pg_dump"), "-Fc", "-f", str(part), *_conn_args(pg, embedded.DATABASE)]
        await asyncio.to_thread(_run, cmd, pg, "pg_dump")
        os.replace(part, file)
        return file.stat().st_size
    finally:
        part.unlink(missing_ok=True)
        await asyncio.to_thread(pg.stop)


async def _others_connected(conn) -> int:
    return await conn.fetchval(
        "select count(*) from pg_stat_activity where datname = $1 and pid <> pg_backend_pid()",
        embedded.DATABASE,
    )


async def _holds_data(conn) -> bool:
    for table in ("public.profiles", "public.request_logs"):
        if await conn.fetchval("select to_regclass($1)", table) is not None:
            if await conn.fetchval(f"select exists (select 1 from {table})"):
                return True
    return False


def _url(pg: embedded.EmbeddedPostgres, database: str) -> str:
    return pg.admin_url.rsplit("/", 1)[0] + "/" + database


async def restore(settings, file: Path, force: bool = False, say=print) -> None:
    file = Path(file)
    if not file.is_file():
        raise BackupError(f"{file}: no such file")
    pg = await asyncio.to_thread(_start, settings)
    try:
        # The cluster's roles (the app's, Supabase's) must exist before the dump's grants run.
        db = await Database(settings, pool_size=1).open()
        await db.close()
        conn = await connect(pg.admin_url)
        try:
            others = await _others_connected(conn)
            if others:
                raise BackupError(
                    f"the embedded database has {others} other connection(s): the app (or another"
                    " vtai command) is running; stop it, then run this again"
                )
            if await _holds_data(conn) and not force:
                raise BackupError(
                    "the embedded database already holds users or usage; pass --force to replace"
                    f" it (back it up first: vtai backup FILE) with {file}"
                )
        finally:
            await conn.close()
        staging = f"{embedded.DATABASE}_restore"
        old = f"{embedded.DATABASE}_before_restore_{int(time.time())}"
        admin = await connect(_url(pg, "postgres"))
        try:
            await admin.execute(f'drop database if exists "{staging}"')
            await admin.execute(f'create database "{staging}" template template0')
            say(f"restoring {file} ...")
            cmd = [_tool("pg_restore"), "--exit-on-error", *_conn_args(pg, staging), str(file)]
            try:
                await asyncio.to_thread(_run, cmd, pg, "pg_restore")
            except BackupError:
                await admin.execute(f'drop database if exists "{staging}"')
                raise
            others = await _others_connected(admin)
            if others:
                await admin.execute(f'drop database if exists "{staging}"')
                raise BackupError(
                    "something connected to the embedded database during the restore; nothing"
                    " was replaced: stop it, then run this again"
                )
            await admin.execute(f'alter database "{embedded.DATABASE}" rename to "{old}"')
            await admin.execute(f'alter database "{staging}" rename to "{embedded.DATABASE}"')
            await admin.execute(f'drop database "{old}"')
        finally:
            await admin.close()
        # Migrations a newer build has, and the app role's password and grants on this cluster.
        db = await Database(settings, pool_size=1).open()
        await db.close()
    finally:
        await asyncio.to_thread(pg.stop)
