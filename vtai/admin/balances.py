"""Provider balances: what each configured provider says is left, in `provider_balances`.

Only OpenRouter exposes a balance (credits minus usage). OpenAI, Anthropic and Gemini have no
API for it, so they are recorded with a null balance and a note saying so. A failed fetch
keeps the last good balance and records the error beside it. API keys are sent only in the
Authorization header: never logged, never stored, scrubbed from any error text.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

import asyncpg
import httpx

from vtai.admin import reconcile
from vtai.notify import balance as notify_balance
from vtai.settings import load_settings

log = logging.getLogger(__name__)

OPENROUTER_BASE = "https://openrouter.ai"
NO_API = "the provider has no API for the account balance; check its billing page"
# provider -> key variable, for providers that have no balance endpoint
NO_BALANCE_API = {
    "openai": "OPENAI_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
    "gemini": "GEMINI_API_KEY",
}
DEFAULT_INTERVAL = 3600


@dataclass(frozen=True)
class Fetched:
    provider: str
    balance: Decimal | None = None
    currency: str | None = None
    note: str | None = None
    error: str | None = None
    # the provider's running total of what it charged, when it reports one (vtai.admin.reconcile)
    usage: Decimal | None = None


def _scrub(text: str, secret: str) -> str:
    text = text.replace(secret, "***") if secret else text
    return " ".join(text.split())[:300]


async def fetch_openrouter(client: httpx.AsyncClient, base: str, key: str) -> Fetched:
    try:
        r = await client.get(
            f"{base.rstrip('/')}/api/v1/credits", headers={"Authorization": f"Bearer {key}"}
        )
        if r.status_code != 200:
            return Fetched("openrouter", error=_scrub(f"HTTP {r.status_code}: {r.text}", key))
        data = r.json()["data"]
        credits = Decimal(str(data["total_credits"]))
        used = Decimal(str(data["total_usage"]))
    except httpx.TimeoutException:
        return Fetched("openrouter", error="timed out")
    except httpx.HTTPError as exc:
        return Fetched("openrouter", error=_scrub(f"{type(exc).__name__}: {exc}", key))
    except (ValueError, KeyError, TypeError, InvalidOperation):
        return Fetched("openrouter", error="unexpected answer from the credits endpoint")
    return Fetched("openrouter", balance=credits - used, currency="USD", usage=used)


async def fetch_all(env: dict[str, str] | None = None, timeout: float = 10.0) -> list[Fetched]:
    """What every configured provider says now; providers without a key are left out.

    The keys and VTAI_OPENROUTER_BASE come from Settings, read from `env` (default: this
    process's environment, as it is now).
    """
    settings = load_settings(env, dotenv=False)
    keys = settings.provider_keys
    found = []
    if "OPENROUTER_API_KEY" in keys:
        base = settings.openrouter_base or OPENROUTER_BASE
        key = keys["OPENROUTER_API_KEY"].get_secret_value()
        async with httpx.AsyncClient(timeout=timeout) as client:
            found.append(await fetch_openrouter(client, base, key))
    for provider, var in NO_BALANCE_API.items():
        if var in keys:
            found.append(Fetched(provider, note=NO_API))
    return found


async def store(pool: asyncpg.Pool, fetched: list[Fetched]) -> None:
    async with pool.acquire() as conn, conn.transaction():
        for f in fetched:
            if f.error is not None:
                # Keep the last good balance; the error sits beside it.
                await conn.execute(
                    "insert into public.provider_balances (provider, error, error_at)"
                    " values ($1, $2, now()) on conflict (provider) do update"
                    " set error = excluded.error, error_at = excluded.error_at",
                    f.provider,
                    f.error,
                )
            else:
                await conn.execute(
                    "insert into public.provider_balances"
                    " (provider, balance, currency, note, fetched_at, error, error_at)"
                    " values ($1, $2, $3, $4, now(), null, null)"
                    " on conflict (provider) do update set balance = excluded.balance,"
                    " currency = excluded.currency, note = excluded.note,"
                    " fetched_at = excluded.fetched_at, error = null, error_at = null",
                    f.provider,
                    f.balance,
                    f.currency,
                    f.note,
                )
        # Under VTAI_WEBHOOK_BALANCE_BELOW: the operator's balance.low, with the balance's row.
        await notify_balance.check(conn, fetched)


async def read(pool: asyncpg.Pool) -> list[dict]:
    rows = await pool.fetch(
        "select provider, balance, currency, fetched_at, note, error, error_at"
        " from public.provider_balances order by provider"
    )
    return [dict(r) for r in rows]


async def sync(
    pool: asyncpg.Pool, env: dict[str, str] | None = None, timeout: float = 10.0
) -> list[dict]:
    """Fetch every configured provider's balance, store it, and return the stored rows."""
    fetched = await fetch_all(env, timeout)
    for f in fetched:
        if f.error:
            log.warning("balance sync for %s failed: %s", f.provider, f.error)
    await store(pool, fetched)
    # A snapshot for the ledger-against-the-bill history, and any day that has ended since.
    await reconcile.after_sync(pool, fetched, env)
    return await read(pool)


def describe(row: dict) -> str:
    """One line per provider, for `vtai balances sync`."""
    if row["balance"] is not None:
        line = f"{row['provider']}: {row['balance']:.2f} {row['currency']}"
        line += f" (as of {row['fetched_at']:%Y-%m-%d %H:%M} UTC)"
    else:
        line = f"{row['provider']}: no balance ({row['note'] or 'never fetched'})"
    if row["error"]:
        line += f"; last sync failed {row['error_at']:%Y-%m-%d %H:%M} UTC: {row['error']}"
    return line


async def cli_sync(pool: asyncpg.Pool) -> int:
    """`vtai balances sync`: prints one line per provider; 1 when a sync failed."""
    rows = await sync(pool)
    if not rows:
        print("no provider keys are set, so there is no balance to fetch")
    for row in rows:
        print(describe(row))
    failed = [r for r in rows if r["error"]]
    return 1 if failed else 0


def interval(env: dict[str, str] | None = None) -> int:
    """Seconds between background syncs (VTAI_BALANCE_SYNC_INTERVAL; 0 turns them off)."""
    return load_settings(env, dotenv=False).balance_sync_interval


def start_periodic(pool: asyncpg.Pool, every: int | None = None) -> asyncio.Task | None:
    """Sync now and then every `every` seconds, until the task is cancelled."""
    every = interval() if every is None else every
    if every <= 0:
        return None

    async def loop() -> None:
        while True:
            try:
                await sync(pool)
            except Exception:
                # A database outage must not end the loop; the next round tries again.
                log.exception("balance sync failed")
            await asyncio.sleep(every)

    return asyncio.create_task(loop(), name="vtai-balance-sync")


async def stop_periodic(task: asyncio.Task | None) -> None:
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
