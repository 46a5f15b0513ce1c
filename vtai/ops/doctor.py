"""`vtai doctor`: everything an operator would otherwise check by hand, a line per check.

Each line is `ok`, `FAIL` (with what to do) or `skip` (does not apply here, and why), printed
as its check ends; the exit status is 1 when any check failed, else 0. The checks:

- database: reachable (the embedded one is started or joined, as every `vtai` command does);
  never migrated by the doctor, so a pending migration shows as one;
- migrations: all applied, none changed since, every function file as applied (vtai.ops.health);
- rls: row-level security and the user-level roles' grants as the migrations intend
  (vtai.ops.rls);
- clock: this host's clock against the database's;
- callback: the app's metering logger in LiteLLM's callbacks once services start;
- probe: a real metered turn on the local model, landing and settling (vtai.ops.probe);
- spool: rows waiting for the database, and the oldest's age (vtai.ops.health, vtai.ops.backlog);
- provider keys: one cheap authenticated request per key set (listing models, or OpenRouter's
  key info), which spends nothing;
- webhooks: each VTAI_WEBHOOK_URLS address answers an HTTP HEAD request. HEAD, not a signed
  test event: reachability is the question, and a receiver then acts on nothing.

With only the Supabase REST API (no database URL) the checks that need SQL say skip.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from types import SimpleNamespace
from urllib.parse import urlsplit

import httpx

from vtai.ops.health import Check, fail, ok, skip

# Seconds each check may take (the probe has its own, vtai.ops.probe.TIMEOUT).
TIMEOUT = 10.0
# Seconds a provider or webhook address has to answer.
HTTP_TIMEOUT = 5.0
# Seconds this host's clock may be off the database's: reservations expire, periods roll and
# rows are dated by both.
CLOCK_SKEW = 5.0
_MARK = {"ok": "ok", "fail": "FAIL", "skip": "skip"}

# Each provider key's cheapest authenticated request: (variable, URL, headers), from its key
# and the base URL VT.ai's calls use.
OPENAI_BASE = "https://api.openai.com/v1"
ANTHROPIC_BASE = "https://api.anthropic.com"
GEMINI_BASE = "https://generativelanguage.googleapis.com"
OPENROUTER_BASE = "https://openrouter.ai"


def key_requests(settings) -> list[tuple[str, str, dict]]:
    keys = {var: key.get_secret_value() for var, key in settings.provider_keys.items()}
    asks = {
        "OPENAI_API_KEY": lambda k: (
            f"{(settings.openai_api_base or OPENAI_BASE).rstrip('/')}/models",
            {"Authorization": f"Bearer {k}"},
        ),
        "ANTHROPIC_API_KEY": lambda k: (
            f"{ANTHROPIC_BASE}/v1/models?limit=1",
            {"x-api-key": k, "anthropic-version": "2023-06-01"},
        ),
        "GEMINI_API_KEY": lambda k: (
            f"{GEMINI_BASE}/v1beta/models?pageSize=1",
            {"x-goog-api-key": k},
        ),
        # OpenRouter lists models to anyone; its key endpoint needs the key.
        "OPENROUTER_API_KEY": lambda k: (
            f"{(settings.openrouter_base or OPENROUTER_BASE).rstrip('/')}/api/v1/key",
            {"Authorization": f"Bearer {k}"},
        ),
    }
    return [(var, *asks[var](key)) for var, key in keys.items() if var in asks]


class Doctor:
    def __init__(self, settings) -> None:
        self.settings = settings
        self.failed = 0
        self.count = 0

    def show(self, name: str, check: Check) -> None:
        self.count += 1
        self.failed += check.state == "fail"
        print(f"{_MARK[check.state]:<5} {name}: {check.detail}", flush=True)

    async def check(self, name: str, work: Awaitable[Check], timeout: float = TIMEOUT) -> Check:
        try:
            async with asyncio.timeout(timeout):
                result = await work
        except TimeoutError:
            result = fail(f"no answer in {timeout:g} s")
        except Exception as exc:
            result = fail(_why(exc))
        self.show(name, result)
        return result

    async def run(self) -> int:
        if self.settings.rest_metering:
            await self._rest()
        else:
            await self._sql()
        await self.check("spool", _spool(self.settings))
        await self._providers()
        await self._webhooks()
        if self.failed:
            print(f"vtai doctor: {self.failed} of {self.count} checks failed", flush=True)
            return 1
        print(f"vtai doctor: all {self.count} checks passed (or do not apply)", flush=True)
        return 0

    async def _rest(self) -> None:
        from vtai.ops import health
        from vtai.rest.store import SupabaseStore
        from vtai.settings import NEEDS_DATABASE

        store = None

        async def reach() -> Check:
            nonlocal store
            try:
                store = await SupabaseStore.connect(
                    self.settings.supabase_url,
                    self.settings.supabase_service_key.get_secret_value(),
                    self.settings.usage_period,
                )
                return await health.database(SimpleNamespace(db=None, store=store))
            except Exception as exc:
                return fail(f"{_why(exc)}: check SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY")

        try:
            await self.check("database", reach())
        finally:
            if store is not None:
                await store.close()
        for name in ("migrations", "rls", "clock", "callback", "probe"):
            self.show(name, skip(f"checking it {NEEDS_DATABASE}"))

    async def _sql(self) -> None:
        from vtai.db.connection import Database

        db = Database(self.settings, pool_size=2)
        opened = await self.check("database", _open(db))
        try:
            if opened.state != "ok":
                for name in ("migrations", "rls", "clock", "callback", "probe"):
                    self.show(name, skip("the database did not answer"))
                return
            current = await self.check("migrations", _migrations(db))
            await self.check("rls", _rls(db.pool))
            await self.check("clock", _clock(db.pool))
            if current.state != "ok":
                why = "the migrations are not current (services would apply them): fix that first"
                self.show("callback", skip(why))
                self.show("probe", skip(why))
                return
            await self._services()
        finally:
            await db.close()

    async def _services(self) -> None:
        from vtai.ops import probe
        from vtai.services import Services

        services = None
        try:
            # No spool replay and no LISTEN connection: the doctor writes only its probe's row.
            settings = self.settings.model_copy(update={"reserve_ahead": False})
            services = await Services.start(settings, replay=False, pool_size=2)
        except Exception as exc:
            self.show("callback", fail(f"services did not start: {_why(exc)}"))
            self.show("probe", skip("services did not start"))
            return
        try:
            self.show("callback", _callback(services))
            await self.check("probe", probe.run(services), probe.TIMEOUT + TIMEOUT)
        finally:
            await services.stop()

    async def _providers(self) -> None:
        asks = key_requests(self.settings)
        if not asks:
            self.show("provider keys", skip("no provider key is set (the local model needs none)"))
            return
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
            for var, url, headers in asks:
                await self.check(var, _key(http, var, url, headers), HTTP_TIMEOUT + 1)

    async def _webhooks(self) -> None:
        urls = getattr(self.settings, "webhook_urls", ())
        if not urls:
            self.show("webhooks", skip("VTAI_WEBHOOK_URLS is not set"))
            return
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT, follow_redirects=False) as http:
            for url in urls:
                await self.check(f"webhook {_site(url)}", _webhook(http, url), HTTP_TIMEOUT + 1)


def _why(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


async def _open(db) -> Check:
    started = time.perf_counter()
    # Not migrated here: a pending migration is for the migrations check to report.
    await db.open(migrate=False)
    await db.pool.fetchval("select 1")
    where = "embedded" if db.settings.database_url is None else "configured"
    return ok(f"the {where} database answered in {(time.perf_counter() - started) * 1000:.0f} ms")


async def _migrations(db) -> Check:
    from vtai.ops import health

    # health caches an "ok" for a minute per process; the doctor asks afresh.
    health._migrations_ok_until = 0.0
    return await health.migrations_current(SimpleNamespace(db=db))


async def _rls(pool) -> Check:
    from vtai.ops import rls

    found = await rls.problems(pool)
    if not found:
        return ok(
            "on for every table in public and vtai_private; anon and authenticated as intended"
        )
    shown = "; ".join(found[:5]) + (f"; and {len(found) - 5} more" if len(found) > 5 else "")
    return fail(
        f"{shown}: put the migrations' policies and grants back"
        " (python scripts/update_request_logs_rls.py, or revoke/enable by hand)"
    )


async def _clock(pool) -> Check:
    before = time.time()
    theirs = float(await pool.fetchval("select extract(epoch from clock_timestamp())"))
    after = time.time()
    skew = (before + after) / 2 - theirs
    if abs(skew) > CLOCK_SKEW + (after - before) / 2:
        way = "ahead of" if skew > 0 else "behind"
        return fail(
            f"this host's clock is {abs(skew):.1f} s {way} the database's: sync both with NTP"
            " (timedatectl set-ntp true, or chrony)"
        )
    return ok(f"within {abs(skew):.2f} s of the database's")


def _callback(services) -> Check:
    import litellm

    from vtai.metering.logger import MeteringLogger

    mine = [cb for cb in litellm.callbacks if isinstance(cb, MeteringLogger)]
    if mine == [services.callback]:
        return ok("the metering logger is in litellm.callbacks (the probe shows it runs)")
    if not mine:
        return fail(
            "no metering logger in litellm.callbacks: answered turns would be recorded late,"
            " from their held copies; see vtai.services.register_callback"
        )
    return fail(f"{len(mine)} metering loggers in litellm.callbacks: rows would be written twice")


async def _spool(settings) -> Check:
    from vtai.metering.spool import Spool
    from vtai.ops import health

    check = await health.spool(
        SimpleNamespace(ledger=SimpleNamespace(spool=Spool(settings.spool_dir)))
    )
    if check.state == "ok" and check.detail != "empty" and not check.detail.startswith("empty;"):
        # Waiting but not stuck: the app's replayer will take them; say how to do it now.
        return ok(f"{check.detail} (`vtai spool replay` sends them now)")
    return check


async def _key(http: httpx.AsyncClient, var: str, url: str, headers: dict) -> Check:
    site = _site(url)
    try:
        r = await http.get(url, headers=headers)
    except httpx.TimeoutException:
        return fail(f"{site} did not answer in {HTTP_TIMEOUT:g} s: check the network to it")
    except httpx.HTTPError as exc:
        return fail(f"could not reach {site} ({_why(exc)}): check the network or the base URL")
    if r.status_code in (401, 403):
        return fail(f"{var} was refused by {site} (HTTP {r.status_code}): set a valid key")
    if r.status_code >= 400:
        return fail(
            f"{site} answered HTTP {r.status_code}: the provider is failing or the URL is wrong"
        )
    return ok(f"accepted by {site}")


async def _webhook(http: httpx.AsyncClient, url: str) -> Check:
    try:
        r = await http.head(url)
    except httpx.TimeoutException:
        return fail(f"no answer in {HTTP_TIMEOUT:g} s: is the receiver up?")
    except httpx.HTTPError as exc:
        return fail(f"could not connect ({_why(exc)}): is the receiver up, the URL right?")
    if r.status_code >= 500:
        return fail(f"answered HTTP {r.status_code}: the receiver is failing")
    # Any other answer is a server listening there (a POST-only route says 405 to HEAD).
    return ok(f"reachable (HTTP {r.status_code} to HEAD)")


def _site(url: str) -> str:
    """scheme://host[:port] only: paths and queries of webhook URLs often hold tokens."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


async def doctor(settings, args) -> int:
    return await Doctor(settings).run()


def register(sub, user) -> None:
    """Add this module's commands: `sub` is vtai's subcommands, `user` those of `vtai user`."""
    cmd = sub.add_parser(
        "doctor",
        help="check the database, migrations, RLS, metering, spool, keys, webhooks and clock",
    )
    cmd.set_defaults(run=doctor)
