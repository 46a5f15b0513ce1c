"""`vtai retention run`, `vtai user export NAME`, `vtai user delete NAME`, `vtai backup FILE`
and `vtai restore FILE` (docs/operations.md, "Retention and data requests")."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import asyncpg

from vtai.db.connection import Database, connect
from vtai.plans import audit
from vtai.retention import backup as backups
from vtai.retention import delete, export, purge
from vtai.settings import NEEDS_DATABASE, Settings


def _cli_error(text: str) -> Exception:
    from vtai.cli import CliError

    return CliError(text)


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def _with_db(settings: Settings, work) -> int:
    if settings.rest_metering:
        raise _cli_error(f"this command {NEEDS_DATABASE}")
    db = await Database(settings, pool_size=2).open()
    try:
        return await work(db)
    finally:
        await db.close()


async def retention_run(settings: Settings, args: argparse.Namespace) -> int:
    days = args.days if args.days is not None else settings.content_retention_days
    if days is None:
        raise _cli_error(
            "VTAI_CONTENT_RETENTION_DAYS is unset (content kept forever): set it or pass --days N"
        )
    if days < 1:
        raise _cli_error("--days: must be at least 1")

    def progress(what: str, done: int, total: int | None, purged: int) -> None:
        of = f" of {total:,}" if total else ""
        unit = "ids" if what == "ledger" else "steps"
        _note(f"{what}: {done:,}{of} {unit} scanned, {purged:,} purged")

    async def work(db: Database) -> int:
        conn = await connect(db.url)
        try:
            done = await purge.purge(conn, days, progress=progress)
        finally:
            await conn.close()
        if done is None:
            raise _cli_error("another process is purging now (the app's hourly run); try later")
        print(
            f"purged the text of {done.ledger_rows:,} ledger rows and {done.steps:,} chat steps"
            f" older than {done.cutoff:%Y-%m-%d %H:%M} UTC in {done.seconds:.1f}s"
            f" ({done.batches} batches, longest {done.longest_batch * 1000:.0f} ms)"
        )
        return 0

    return await _with_db(settings, work)


async def user_export(settings: Settings, args: argparse.Namespace) -> int:
    out = Path(args.output or f"{args.name}-export.zip")

    def progress(name: str, rows: int) -> None:
        _note(f"{name}: {rows:,} rows")

    async def work(db: Database) -> int:
        async with db.pool.acquire() as conn:
            try:
                counts = await export.export(conn, args.name, out, progress)
            except export.ExportError as exc:
                raise _cli_error(str(exc)) from None
            except OSError as exc:
                raise _cli_error(f"{out}: {exc.strerror or exc}") from None
        print(f"wrote {out} ({sum(counts.values()):,} rows in {len(counts) + 1} files)")
        return 0

    return await _with_db(settings, work)


def _confirmed(name: str) -> bool:
    if not sys.stdin.isatty():
        raise _cli_error("pass --yes to delete without a terminal to confirm at")
    answer = input(
        f"Delete {name}: account, chats and content, for good (billing rows stay, anonymised)?"
        " Type the name to confirm: "
    )
    return answer.strip() == name


async def user_delete(settings: Settings, args: argparse.Namespace) -> int:
    async def work(db: Database) -> int:
        async with db.pool.acquire() as conn:
            if (
                await conn.fetchval("select 1 from public.profiles where username = $1", args.name)
                is None
            ):
                raise _cli_error(f"no user named {args.name!r} (see: vtai user list)")
        if not args.yes and not _confirmed(args.name):
            raise _cli_error("not confirmed; nothing was deleted")
        try:
            done = await delete.delete_user(db, settings, args.name, audit.cli_actor(), _note)
        except delete.DeleteError as exc:
            raise _cli_error(str(exc)) from None
        except asyncpg.NoDataFoundError:
            raise _cli_error(f"{args.name} was deleted meanwhile") from None
        for note in done.notes:
            print(f"vtai: warning: {note}", file=sys.stderr)
        print(
            f"deleted {args.name}: {done.ledger_rows:,} ledger rows kept anonymised, "
            f"{done.threads:,} chats removed, {done.billing_events:,} billing events and "
            f"{done.audit_rows:,} audit rows anonymised"
        )
        return 0

    return await _with_db(settings, work)


async def backup_run(settings: Settings, args: argparse.Namespace) -> int:
    if not settings.embedded:
        raise _cli_error(backups.NOT_EMBEDDED)
    try:
        size = await backups.backup(settings, Path(args.file), _note)
    except backups.BackupError as exc:
        raise _cli_error(str(exc)) from None
    print(f"wrote {args.file} ({size:,} bytes); restore it with `vtai restore {args.file}`")
    return 0


async def restore_run(settings: Settings, args: argparse.Namespace) -> int:
    if not settings.embedded:
        raise _cli_error(backups.NOT_EMBEDDED)
    try:
        await backups.restore(settings, Path(args.file), args.force, _note)
    except backups.BackupError as exc:
        raise _cli_error(str(exc)) from None
    print(f"restored {args.file} into the embedded database in {settings.data_dir}")
    return 0


def register(sub, user) -> None:
    """Add this module's commands: `sub` is vtai's subcommands, `user` those of `vtai user`."""
    retention = sub.add_parser(
        "retention", help="purge prompt and answer text past VTAI_CONTENT_RETENTION_DAYS"
    ).add_subparsers(dest="action", required=True)
    run = retention.add_parser("run", help="purge now, in small batches, with progress")
    run.add_argument("--days", type=int, help="instead of VTAI_CONTENT_RETENTION_DAYS")
    run.set_defaults(run=retention_run)

    exp = user.add_parser("export", help="everything about a user, as a ZIP of JSON files")
    exp.add_argument("name")
    exp.add_argument("-o", "--output", metavar="FILE", help="default: NAME-export.zip")
    exp.set_defaults(run=user_export)
    rm = user.add_parser(
        "delete", help="delete a user and their content; billing rows stay, anonymised"
    )
    rm.add_argument("name")
    rm.add_argument("--yes", action="store_true", help="don't ask for confirmation")
    rm.set_defaults(run=user_delete)

    bk = sub.add_parser("backup", help="dump the embedded database to FILE")
    bk.add_argument("file", metavar="FILE")
    bk.set_defaults(run=backup_run)
    rs = sub.add_parser("restore", help="replace the embedded database with a backup")
    rs.add_argument("file", metavar="FILE")
    rs.add_argument("--force", action="store_true", help="even if it holds users or usage")
    rs.set_defaults(run=restore_run)
