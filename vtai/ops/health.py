"""Health checks: is the process serving (liveness), and can it do its work (readiness).

Liveness never touches the database: a database outage must not take the app out of a load
balancer, because the spool and the gate's fail mode exist to serve through one. Readiness
asks the database (over the REST API in REST-only mode), the migrations, the spool and the
local model, each check within a short timeout, for orchestrators and people.

Each check's state is "ok", "fail" or "skip" (does not apply here), with a one-line detail.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass

from vtai.ops import backlog

# Seconds each readiness check may take: a probe must answer well inside its own timeout.
CHECK_TIMEOUT = 2.0
# The oldest spooled row older than this, and the spool is stuck: the replayer backs off to a
# minute at most, so rows this old mean the database keeps refusing them.
SPOOL_STUCK = 600.0
# How long a "migrations current" answer is kept: they change only when someone migrates.
MIGRATIONS_FRESH = 60.0

STARTED = time.time()


@dataclass(frozen=True)
class Check:
    state: str
    detail: str


def ok(detail: str) -> Check:
    return Check("ok", detail)


def fail(detail: str) -> Check:
    return Check("fail", detail)


def skip(detail: str) -> Check:
    return Check("skip", detail)


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer in {CHECK_TIMEOUT:g} s"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


def report(checks: dict[str, Check]) -> tuple[bool, dict]:
    """(healthy, the JSON body): healthy when no check failed."""
    healthy = all(c.state != "fail" for c in checks.values())
    body = {
        "status": "ok" if healthy else "fail",
        "checks": {name: asdict(c) for name, c in checks.items()},
    }
    return healthy, body


# --- Liveness -------------------------------------------------------------------------------


def liveness(services) -> dict[str, Check]:
    """The process answers and its services run; nothing here waits on anything."""
    process = ok(f"pid {os.getpid()}, up {time.time() - STARTED:.0f} s")
    if services is None:
        return {"process": process, "services": fail("not running (starting or stopping)")}
    mode = "database" if services.db is not None else "Supabase REST API"
    return {"process": process, "services": ok(f"metering over the {mode}")}


# --- Readiness ------------------------------------------------------------------------------


async def readiness(services) -> dict[str, Check]:
    if services is None:
        return {"services": fail("not running (starting or stopping)")}
    names = ("database", "migrations", "spool", "local_model")
    results = await asyncio.gather(
        _timed(database(services)),
        _timed(migrations_current(services)),
        _timed(spool(services)),
        _timed(local_model(services)),
    )
    return dict(zip(names, results, strict=True))


async def _timed(check) -> Check:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            return await check
    except Exception as exc:
        return fail(_why(exc))


async def database(services) -> Check:
    started = time.perf_counter()
    if services.db is None:
        # REST-only mode: a real call of the metering functions through PostgREST (a user
        # who does not exist: nothing is read or changed).
        await services.store.usage(uuid.UUID(int=0))
        return ok(f"the REST API answered in {_ms(started)}")
    async with services.db.pool.acquire() as conn:
        await conn.fetchval("select 1")
    return ok(f"answered in {_ms(started)}")


def _ms(started: float) -> str:
    return f"{(time.perf_counter() - started) * 1000:.0f} ms"


_migrations_ok_until = 0.0


async def migrations_current(services) -> Check:
    """Every migration applied, none changed since, every function file as applied."""
    global _migrations_ok_until
    if services.db is None:
        from vtai.settings import NEEDS_DATABASE

        return skip(f"checking them {NEEDS_DATABASE}")
    if time.monotonic() < _migrations_ok_until:
        return ok("all applied (checked in the last minute)")
    from vtai.db import migrations

    db = services.db
    # The embedded server's app role may not read the migration records; its superuser may.
    if db.admin_url and db.admin_url != db.url:
        from vtai.db.connection import connect

        conn = await connect(db.admin_url, timeout=CHECK_TIMEOUT)
        try:
            problems = await _migration_problems(conn, migrations)
        finally:
            await conn.close()
    else:
        async with db.pool.acquire() as conn:
            problems = await _migration_problems(conn, migrations)
    if problems:
        return fail("; ".join(problems) + ": restart the app (start-up applies them)")
    _migrations_ok_until = time.monotonic() + MIGRATIONS_FRESH
    return ok("all applied")


async def _migration_problems(conn, migrations) -> list[str]:
    try:
        plan = await migrations.plan(conn)
        stale = await migrations.stale_functions(conn)
        changed = await migrations.changed(conn)
    except migrations.MigrationError as exc:
        return [str(exc)]
    problems = []
    pending = [*plan.adopt, *plan.todo]
    if pending:
        problems.append(f"{len(pending)} pending ({', '.join(m.path.name for m in pending)})")
    if stale:
        problems.append(f"function files not applied: {', '.join(f.name for f in stale)}")
    if changed:
        return [migrations.describe_changed(changed)]
    return problems


async def spool(services) -> Check:
    state = await asyncio.to_thread(backlog.of, services.ledger.spool)
    aside = f"; {state.quarantined} quarantined" if state.quarantined else ""
    if not state.rows:
        return ok("empty" + aside)
    age = state.oldest_age or 0.0
    waiting = f"{state.rows} row(s) waiting, the oldest {age:.0f} s old{aside}"
    if age > SPOOL_STUCK:
        return fail(f"{waiting}: the database is not taking them (vtai spool status)")
    return ok(waiting)


async def local_model(services) -> Check:
    from vtai.llm.models import LOCAL_MODEL_ID

    if services.settings.model != LOCAL_MODEL_ID:
        return skip(f"the default model is {services.settings.model}")
    # Loaded once at start-up (vtai.ui.chat.startup), in a thread: imported means asked for.
    module = sys.modules.get("vtai.llm.local_model")
    if module is None or getattr(module, "_server", None) is None:
        return fail(f"{LOCAL_MODEL_ID} is not loaded yet")
    return ok(f"{LOCAL_MODEL_ID} loaded")
