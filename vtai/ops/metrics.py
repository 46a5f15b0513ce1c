"""Prometheus metrics of a VT.ai process, served at /metrics by vtai.ops.routes.

The functions here are called where each fact happens: the turn (vtai.metering.turn), the
ledger's writer (vtai.metering.ledger, .logger) and the spool (vtai.metering.spool, .replay).
None of them raises: a metric that fails is logged once and the turn goes on, as LiteLLM's
CustomLogger hooks never raise into the call.

Several processes on one host: start each with the same PROMETHEUS_MULTIPROC_DIR (an empty
directory, emptied before the first process starts; prometheus_client reads the variable
itself, at import). Each process writes its values there and any one of them serves the sum
at /metrics. Gauges that describe one data dir (the spool) carry it as the `spool` label and
are merged with `livemax`, so processes sharing a data dir report it once and processes with
data dirs of their own report one series each. Files of processes that died are dropped from
the live gauges at the next scrape; their counters keep counting.

The webhook outbox's depth (vtai.notify) is read at scrape time, like the reservations.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import glob
import logging
import os
import re
import sys
import time
from collections.abc import Awaitable, Iterator
from typing import TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
    values,
)

from vtai.ops import backlog

log = logging.getLogger(__name__)
T = TypeVar("T")

# prometheus_client picked its value class from PROMETHEUS_MULTIPROC_DIR when it was imported.
MULTIPROCESS = bool(getattr(values.ValueClass, "_multiprocess", False))

# The `_created` series double every counter's lines and no dashboard here reads them.
disable_created_metrics()
REGISTRY = CollectorRegistry(auto_describe=True)
if not MULTIPROCESS:
    # Per-process figures mean nothing summed over processes, so only a lone process has them.
    for _collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        REGISTRY.register(_collector)

# A label value taken from a request (a model nobody offered) is never a series of its own.
UNCHECKED = "-"
# Past this many distinct models a new one is counted as "other": bounded series, whatever
# the catalogue holds.
MAX_MODELS = 200

TURNS = Counter(
    "vtai_turns",
    "Turns by how they ended: answered, refused, failed, invalid, stopped, error.",
    ["status", "model", "source"],
    registry=REGISTRY,
)
REFUSALS = Counter(
    "vtai_refusals", "Refused turns by the refusal's reason.", ["reason"], registry=REGISTRY
)
TOKENS = Counter(
    "vtai_tokens",
    "Tokens charged by rows that landed in the ledger, by model and kind (prompt, completion).",
    ["model", "kind"],
    registry=REGISTRY,
)
COST = Counter(
    "vtai_cost_usd",
    "US dollars charged by rows that landed in the ledger, by model.",
    ["model"],
    registry=REGISTRY,
)
LEDGER_ROWS = Counter(
    "vtai_ledger_rows",
    "Rows that landed in the ledger (new, not duplicates), by status.",
    ["status"],
    registry=REGISTRY,
)
GATE_SECONDS = Histogram(
    "vtai_gate_reserve_seconds",
    "Time of the gate's reserve call (vtai_reserve) on a turn's path.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
LEDGER_BATCH_ROWS = Histogram(
    "vtai_ledger_batch_rows",
    "Rows per ledger write (one vtai_record_batch call).",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
    registry=REGISTRY,
)
LEDGER_BATCH_SECONDS = Histogram(
    "vtai_ledger_batch_seconds",
    "Time of one ledger write, by result (ok, error: its rows went to the spool).",
    ["result"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
SPOOLED = Counter(
    "vtai_spool_appended_rows",
    "Rows written to the spool because the database did not take them.",
    registry=REGISTRY,
)
QUARANTINED = Counter(
    "vtai_spool_quarantined_rows",
    "Spooled rows set aside as unreadable or rejected by the database.",
    registry=REGISTRY,
)
SPOOL_ROWS = Gauge(
    "vtai_spool_rows",
    "Rows waiting in the spool for the database, by spool directory.",
    ["spool"],
    multiprocess_mode="livemax",
    registry=REGISTRY,
)
SPOOL_AGE = Gauge(
    "vtai_spool_oldest_age_seconds",
    "Age of the oldest row waiting in the spool (0: none), by spool directory.",
    ["spool"],
    multiprocess_mode="livemax",
    registry=REGISTRY,
)
RESERVATIONS = Gauge(
    "vtai_reservations_held",
    "Unexpired reservations in the database, read at scrape time (-1: could not be read).",
    multiprocess_mode="mostrecent",
    registry=REGISTRY,
)
RESERVED_TOKENS = Gauge(
    "vtai_reservations_held_tokens",
    "Tokens set aside by unexpired reservations, read at scrape time.",
    multiprocess_mode="mostrecent",
    registry=REGISTRY,
)
WEBHOOK_OUTBOX = Gauge(
    "vtai_webhook_outbox_depth",
    "Webhook deliveries waiting (not delivered, not given up), read at scrape time: `database`"
    " (the outbox) and `local` (this process's own queue); -1: could not be read.",
    ["queue"],
    multiprocess_mode="mostrecent",
    registry=REGISTRY,
)
PROVIDER_ERRORS = Counter(
    "vtai_provider_errors",
    "Model calls that failed, by model and the exception's class.",
    ["model", "class"],
    registry=REGISTRY,
)
CALLBACK_ERRORS = Counter(
    "vtai_callback_errors",
    "LiteLLM success hooks that failed (their rows wait on disk for the next start-up).",
    registry=REGISTRY,
)
API_UNAUTHENTICATED = Counter(
    "vtai_api_unauthenticated_requests",
    "Requests to /v1 refused before an API key was recognised.",
    registry=REGISTRY,
)

# How long the scrape waits for the database's count of reservations.
RESERVATIONS_TIMEOUT = 1.0

_models: set[str] = set()
_failed: set[str] = set()


def _never_raises(fn):
    """A metric that fails is logged (once per function) and never reaches the caller."""

    @functools.wraps(fn)
    def safe(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception:
            if fn.__name__ not in _failed:
                _failed.add(fn.__name__)
                log.exception("metric %s failed (logged once; the turn goes on)", fn.__name__)

    return safe


def _model(model: object) -> str:
    name = str(model or UNCHECKED)
    if name in _models:
        return name
    if len(_models) >= MAX_MODELS:
        return "other"
    _models.add(name)
    return name


# --- The turn -----------------------------------------------------------------------------

# Refusals that come before the model is checked against the offered list.
_UNCHECKED_REASONS = frozenset({"message_too_long", "model_not_offered"})


@_never_raises
def turn_ended(req, outcome) -> None:
    """A turn ended with `outcome` (a TurnOutcome), or with the exception in flight (None)."""
    if outcome is None:
        exc = sys.exc_info()[1]
        status = "stopped" if isinstance(exc, asyncio.CancelledError) else "error"
        checked = True
    else:
        status = outcome.kind
        reason = getattr(outcome, "reason", None)
        checked = status in ("answered", "failed") or (
            outcome.grant is not None or (reason is not None and reason not in _UNCHECKED_REASONS)
        )
        if status == "refused":
            REFUSALS.labels(reason or "unknown").inc()
    model = _model(req.model) if checked else UNCHECKED
    TURNS.labels(status, model, str(getattr(req, "source", None) or "chat")).inc()


async def timed_gate(call: Awaitable[T]) -> T:
    """Awaits the gate's reserve call, timed; the call's own error goes on up."""
    started = time.perf_counter()
    try:
        return await call
    finally:
        _observe(GATE_SECONDS, time.perf_counter() - started)


@_never_raises
def _observe(histogram, seconds: float) -> None:
    histogram.observe(seconds)


@_never_raises
def provider_error(model: str, exc: BaseException) -> None:
    PROVIDER_ERRORS.labels(_model(model), type(exc).__name__).inc()


# --- The ledger ---------------------------------------------------------------------------


@contextlib.contextmanager
def ledger_batch(rows: int) -> Iterator[None]:
    """Times one ledger write of `rows` rows in its `with` block, by whether it raised."""
    started = time.perf_counter()
    result = "error"
    try:
        yield
        result = "ok"
    finally:
        _batch_done(rows, result, time.perf_counter() - started)


@_never_raises
def _batch_done(rows: int, result: str, seconds: float) -> None:
    LEDGER_BATCH_ROWS.observe(rows)
    LEDGER_BATCH_SECONDS.labels(result).observe(seconds)


@_never_raises
def rows_landed(rows: list[dict], results: list) -> None:
    """Rows written to the ledger: `results[i]` True when row i was new (False: a duplicate,
    None: spooled), so a row's tokens and cost count once, whichever write lands it."""
    for row, new in zip(rows, results, strict=False):
        if new is not True:
            continue
        LEDGER_ROWS.labels(str(row.get("status") or "unknown")).inc()
        prompt, completion = row.get("prompt_tokens") or 0, row.get("completion_tokens") or 0
        cost = float(row.get("total_cost") or 0)
        if not (prompt or completion or cost):
            continue
        model = _model(row.get("model"))
        TOKENS.labels(model, "prompt").inc(prompt)
        TOKENS.labels(model, "completion").inc(completion)
        COST.labels(model).inc(cost)


@_never_raises
def callback_failed() -> None:
    CALLBACK_ERRORS.inc()


# --- The spool ----------------------------------------------------------------------------


@_never_raises
def spooled(rows: int) -> None:
    SPOOLED.inc(rows)


@_never_raises
def quarantined() -> None:
    QUARANTINED.inc()


def _publish_spool(spool) -> None:
    state = backlog.of(spool)
    label = str(spool.directory)
    SPOOL_ROWS.labels(label).set(state.rows)
    SPOOL_AGE.labels(label).set(state.oldest_age or 0.0)


@_never_raises
def api_unauthenticated() -> None:
    """A request to /v1 without a valid key (vtai.api.routes)."""
    API_UNAUTHENTICATED.inc()


async def publish(spool) -> None:
    """This process's share of the gauges: its spool's backlog. Run by the replayer's loop
    (every pass) and before each scrape."""
    try:
        await asyncio.to_thread(_publish_spool, spool)
    except Exception:
        if "publish" not in _failed:
            _failed.add("publish")
            log.exception("publishing the spool's metrics failed (logged once)")


# --- The scrape ---------------------------------------------------------------------------


async def _count_reservations(services) -> None:
    if services.db is None or services.db.pool is None:
        return  # REST-only mode: the REST API has no count of them
    try:
        async with asyncio.timeout(RESERVATIONS_TIMEOUT):
            async with services.db.pool.acquire() as conn:
                row = await conn.fetchrow(
                    "select count(*) as n, coalesce(sum(amount), 0)::bigint as tokens"
                    " from public.reservations where expires_at > now()"
                )
        RESERVATIONS.set(row["n"])
        RESERVED_TOKENS.set(row["tokens"])
    except Exception as exc:
        log.debug("reservations not counted: %s", type(exc).__name__)
        RESERVATIONS.set(-1)


async def _count_outbox(services) -> None:
    from vtai.notify import delivery

    try:
        async with asyncio.timeout(RESERVATIONS_TIMEOUT):
            found = await delivery.depth(services)
        for queue, n in found.items():
            WEBHOOK_OUTBOX.labels(queue).set(n)
    except Exception as exc:
        log.debug("webhook outbox not counted: %s", type(exc).__name__)
        WEBHOOK_OUTBOX.labels("database").set(-1)


async def scrape(services) -> tuple[bytes, str]:
    """The exposition text (and its content type) after the scrape-time gauges are read."""
    await publish(services.ledger.spool)
    await _count_reservations(services)
    await _count_outbox(services)
    return await asyncio.to_thread(_render), CONTENT_TYPE_LATEST


def _render() -> bytes:
    if not MULTIPROCESS:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    collector = multiprocess.MultiProcessCollector(registry)
    _forget_dead_processes(collector._path)
    return generate_latest(registry)


_LIVE_FILE = re.compile(r"gauge_live\w+?_(\d+)\.db$")


def _forget_dead_processes(directory: str) -> None:
    """A killed process never marked itself dead: its live gauges would stay forever."""
    found = (_LIVE_FILE.search(f) for f in glob.glob(os.path.join(directory, "gauge_live*.db")))
    pids = {int(m.group(1)) for m in found if m}
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, directory)
        except PermissionError:
            pass  # alive, someone else's


if MULTIPROCESS:
    atexit.register(lambda: multiprocess.mark_process_dead(os.getpid()))
