"""The ledger against the bill: each ended UTC day, the ledger's cost per provider beside what
the provider says it charged, stored in `ledger_reconciliations`.

Every successful balance sync of a provider that reports its spend (OpenRouter: its running
usage total) leaves a snapshot in `provider_spend_snapshots`; after each sync, the days that
have ended since are reconciled. The windows, the sums, the drift rule and the `ledger.drift`
outbox event are SQL (supabase/migrations/functions/80_reconcile.sql); this module takes the
snapshots, passes the thresholds from Settings, and reads the result for /admin and the CLI.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import asyncpg

from vtai.settings import Settings, load_settings

if TYPE_CHECKING:
    from vtai.admin.balances import Fetched

log = logging.getLogger(__name__)

# How many ended days a run looks back for days not yet reconciled (a first run, an outage).
CATCH_UP_DAYS = 7
REPORT_DAYS = 30


def _thresholds(settings: Settings) -> tuple[Decimal, Decimal]:
    return settings.drift_alert_percent, settings.drift_alert_min_usd


async def snapshot(pool: asyncpg.Pool, fetched: list[Fetched], at: datetime | None = None) -> int:
    """Store what each provider that reports its spend said; returns how many were stored."""
    rows = [
        (f.provider, f.usage, f.balance, at or datetime.now(UTC))
        for f in fetched
        if f.error is None and (f.usage is not None or f.balance is not None)
    ]
    if rows:
        await pool.executemany(
            "insert into public.provider_spend_snapshots (provider, usage, balance, taken_at)"
            " values ($1, $2, $3, $4)",
            rows,
        )
    return len(rows)


async def run_due(
    pool: asyncpg.Pool,
    settings: Settings | None = None,
    now: datetime | None = None,
    days: int = CATCH_UP_DAYS,
) -> list[dict]:
    """Reconcile every ended day of the last `days` that has no row yet; the new rows."""
    settings = settings or load_settings(dotenv=False)
    percent, min_usd = _thresholds(settings)
    rows = await pool.fetch(
        "select * from public.vtai_reconcile_due($1, $2, $3, $4)",
        percent,
        min_usd,
        now or datetime.now(UTC),
        days,
    )
    return [dict(r) for r in rows]


async def run_day(pool: asyncpg.Pool, day: date, settings: Settings | None = None) -> list[dict]:
    """Reconcile one day again (after late ledger rows); its rows. An alert already sent for
    it is not sent again."""
    settings = settings or load_settings(dotenv=False)
    percent, min_usd = _thresholds(settings)
    rows = await pool.fetch(
        "select * from public.vtai_reconcile_day($1, $2, $3)", day, percent, min_usd
    )
    return [dict(r) for r in rows]


async def after_sync(
    pool: asyncpg.Pool, fetched: list[Fetched], env: Mapping[str, str] | None = None
) -> None:
    """The balance sync's hook: snapshot, then reconcile what is due. Never raises: a failure
    here must not fail the balance sync, and the next sync tries the days again."""
    try:
        await snapshot(pool, fetched)
        for row in await run_due(pool, load_settings(env, dotenv=False)):
            if row["alert"]:
                log.warning("ledger drift: %s", describe(row))
    except (asyncpg.PostgresError, OSError) as exc:
        log.warning("ledger reconciliation failed: %s; the next balance sync retries", exc)


_MONEY = ("ledger_usd", "provider_usd", "drift_usd", "drift_percent")


def _json(row: Mapping[str, Any]) -> dict:
    # Decimals as strings: JSON numbers would round the ledger's 8 decimal places.
    return {k: (str(v) if k in _MONEY and v is not None else v) for k, v in row.items()}


async def read(pool: asyncpg.Pool, days: int = REPORT_DAYS) -> list[dict]:
    """The stored rows of the last `days` UTC days, newest first."""
    rows = await pool.fetch(
        "select provider, day, window_start, window_end, ledger_usd, provider_usd,"
        " drift_usd, drift_percent, alert, alert_event, note, computed_at"
        " from public.ledger_reconciliations"
        " where day >= (now() at time zone 'UTC')::date - $1::int"
        " order by day desc, provider",
        days,
    )
    return [dict(r) for r in rows]


async def report(
    pool: asyncpg.Pool, days: int = REPORT_DAYS, settings: Settings | None = None
) -> dict:
    """/admin/api/reconciliation: the last `days` days' rows, and per provider whether it can
    be reconciled by machine (and how to check it when not)."""
    settings = settings or load_settings(dotenv=False)
    percent, min_usd = _thresholds(settings)
    rows = await read(pool, days)
    # Providers seen in the rows or with a key set (they have a balance row), each once.
    providers = await pool.fetch(
        "select p.provider, p.provider = any (public.vtai_spend_api_providers()) as spend_api,"
        " case when p.provider <> all (public.vtai_spend_api_providers())"
        " then public.vtai_reconcile_note(p.provider) end as note"
        " from (select provider from public.ledger_reconciliations"
        " where day >= (now() at time zone 'UTC')::date - $1::int"
        " union select provider from public.provider_balances) p order by 1",
        days,
    )
    return {
        "rows": [_json(r) for r in rows],
        "providers": [dict(p) for p in providers],
        "alert_percent": str(percent),
        "alert_min_usd": str(min_usd),
    }


def describe(row: Mapping[str, Any]) -> str:
    """One line per provider and day, for `vtai reconcile` and the log."""
    head = f"{row['day']} {row['provider']}: ledger ${row['ledger_usd']:.4f}"
    if row["provider_usd"] is None:
        return f"{head}; {row['note']}"
    pct = "n/a" if row["drift_percent"] is None else f"{row['drift_percent']:+.2f}%"
    line = (
        f"{head}, provider ${row['provider_usd']:.4f}, drift ${row['drift_usd']:+.4f} ({pct})"
        f" from {row['window_start']:%Y-%m-%d %H:%M} to {row['window_end']:%Y-%m-%d %H:%M} UTC"
    )
    return line + ("  ALERT" if row["alert"] else "")


# --- `vtai reconcile` (vtai.cli adds it with register(sub, user)) ---------------------------


async def _cli(settings: Settings, args: argparse.Namespace) -> int:
    from vtai.cli import CliError, _with_db

    if not 1 <= args.days <= 366:
        raise CliError(f"--days: 1 to 366, not {args.days}")
    day = None
    if args.day:
        try:
            day = date.fromisoformat(args.day)
        except ValueError:
            raise CliError(f"--day: expected a date like 2026-12-01, not {args.day!r}") from None
        if day >= datetime.now(UTC).date():
            raise CliError(f"--day: {day} has not ended yet (UTC); pick an earlier day")

    async def work(db) -> int:
        if day is not None:
            rows = await run_day(db.pool, day, settings)
        else:
            await run_due(db.pool, settings)
            rows = await read(db.pool, args.days)
        if not rows:
            print("nothing to reconcile: no ledger rows and no provider snapshots in those days")
        for row in rows:
            print(describe(row))
        return 1 if any(r["alert"] for r in rows) else 0

    return await _with_db(settings, work)


def register(sub, user) -> None:
    """`vtai reconcile [--day D] [--days N]`: exits 1 when a shown day's drift alerts."""
    p = sub.add_parser("reconcile", help="the ledger against each provider's bill, per UTC day")
    p.add_argument("--day", metavar="YYYY-MM-DD", help="reconcile this ended day again")
    p.add_argument("--days", type=int, default=REPORT_DAYS, help="days to show (default 30)")
    p.set_defaults(run=_cli)
