"""Fault scenarios at a realistic size; writes docs/reliability.md.

    .venv/bin/python -m benchmarks.faults [--scale 1.0] [--out docs/reliability.md]

Everything real except the model: a PostgreSQL 18 of its own (embedded, in a temp dir, so it
can be SIGKILLed), the real app processes, LiteLLM's real HTTP path, and the FAKE provider of
tests/fake_provider.py standing in for real providers. Every number in the generated page
comes from this run.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import asyncpg  # noqa: E402

from tests.conftest import build_template, create_database, make_settings  # noqa: E402
from tests.db.test_embedded import kill_postmaster  # noqa: E402
from tests.fake_provider import FakeProvider  # noqa: E402
from tests.test_app_kill import kill_mid_burst, setup_users  # noqa: E402
from vtai.db import embedded as embedded_pg  # noqa: E402
from vtai.metering.logger import estimate_tokens  # noqa: E402
from vtai.metering.turn import TurnRequest, TurnRunner  # noqa: E402
from vtai.services import Services  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = "openai/fake"
TEMPLATE = "vtai_bench_template"
KILL_LIMIT = 1_000
PROVIDER_LIMIT = 1_000_000


@dataclass
class Row:
    scenario: str
    turns: int
    rows_expected: int
    rows_found: int
    tokens_expected: int
    tokens_found: int
    overshoot: int
    counters_ok: bool
    reserved_left: int
    duplicates: int
    seconds: float
    notes: list[str] = field(default_factory=list)


def row_from_facts(scenario: str, results: list, facts: dict, began: float, notes: list) -> Row:
    """A scenario where every attempted turn must end as one ledger row."""
    return Row(
        scenario,
        len(results),
        len(results),
        facts["found"],
        sum(r.tokens for r in results),
        facts["tokens_found"],
        facts["overshoot"],
        facts["counters_ok"],
        facts["reserved"],
        facts["duplicates"],
        time.monotonic() - began,
        notes,
    )


@dataclass
class Finished:
    call_id: str
    kind: str
    tokens: int  # what the turn itself saw: provider usage, or the estimate of what streamed


async def _ignore(_token: str) -> None:
    return None


async def new_database(server_url: str, users: int, limit: int) -> tuple[str, list[uuid.UUID]]:
    url = await create_database(server_url, TEMPLATE)
    return url, await setup_users(url, users, limit)


def expected_tokens(text: str, outcome) -> int:
    if outcome.kind == "answered":
        return int(outcome.usage.get("total_tokens", 0))
    if outcome.kind == "failed" and outcome.reply:
        # A broken stream is billed by estimate for what reached the user (docs/metering.md).
        prompt, completion = estimate_tokens(
            MODEL, [{"role": "user", "content": text}], outcome.reply
        )
        return prompt + completion
    return 0


async def burst(runner: TurnRunner, ids, turns: int, spacing: float, on_done=None):
    async def one(i: int) -> Finished:
        await asyncio.sleep(spacing * i)
        text = f"question {i}"
        req = TurnRequest(ids[i % len(ids)], f"chat-{i}", MODEL, [], text)
        outcome = await runner.run(req, _ignore)
        done = Finished(outcome.call_id, outcome.kind, expected_tokens(text, outcome))
        if on_done:
            on_done(done)
        return done

    return await asyncio.gather(*(one(i) for i in range(turns)))


async def ledger_facts(url: str, call_ids: set[str], limit: int) -> dict:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("select litellm_call_id, total_tokens from request_logs")
        logged = {r["litellm_call_id"]: r["total_tokens"] for r in rows}
        over = await conn.fetchval(
            "select coalesce(max(used - $1), 0) from usage_counters where used > $1", limit
        )
        held = await conn.fetchrow(
            "select count(*) as n, coalesce(sum(amount), 0) as tokens,"
            " count(*) filter (where exists (select 1 from request_logs l"
            "  where l.additional_details->>'reservation_id' = r.id::text)) as referenced"
            " from reservations r"
        )
        return {
            "held": dict(held),
            "found": len(call_ids & set(logged)),
            "tokens_found": sum(t for c, t in logged.items() if c in call_ids),
            "extra": len(set(logged) - call_ids),
            "duplicates": len(rows) - len(logged),
            "counters_ok": not await conn.fetch("select * from vtai_verify_counters()"),
            "reserved": int(
                await conn.fetchval("select coalesce(sum(reserved), 0) from usage_counters")
            ),
            "overshoot": int(over),
        }
    finally:
        await conn.close()


async def settle(services: Services, runner: TurnRunner) -> None:
    # The last success hooks run in LiteLLM's logging worker shortly after the last turn.
    await asyncio.sleep(2.0)
    await runner.drain()
    for _ in range(20):
        await services.ledger.replayer.replay()
        if not services.ledger.spool.status().waiting:
            return
        await asyncio.sleep(0.5)


def runner_for(services: Services, api_base: str) -> TurnRunner:
    return TurnRunner(
        services.gate,
        services.ledger,
        services.callback.notes,
        services.settings,
        call_options={"api_base": api_base, "api_key": "sk-test", "max_retries": 0},
    )


async def db_kill(server, provider, data: Path, mode: str, turns: int, limit: int) -> Row:
    """tests/test_faults.py at size: the database is SIGKILLed once a quarter of the turns
    have finished, stays down a second, and comes back."""
    began = time.monotonic()
    url, ids = await new_database(server.url, users=10, limit=limit)
    settings = make_settings(url, data, gate_fail_mode=mode, max_tokens=32)
    services = await Services.start(settings, replay=False)
    runner = runner_for(services, provider.url("ok"))
    quarter = asyncio.Event()
    count = 0

    def on_done(_):
        nonlocal count
        count += 1
        if count == turns // 4:
            quarter.set()

    async def chaos():
        await quarter.wait()
        await asyncio.to_thread(kill_postmaster, server.pid)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(server.restart)

    try:
        results, _ = await asyncio.gather(burst(runner, ids, turns, 0.01, on_done), chaos())
        await settle(services, runner)
        spooled = services.ledger.spool.status()
    finally:
        await services.stop()
    # restart() reuses the port when it is free; the app's pool depended on that as well
    assert url.split("@")[1].startswith(f"127.0.0.1:{server.port}/"), "the server moved"
    facts = await ledger_facts(url, {r.call_id for r in results}, limit)
    kinds = {k: sum(r.kind == k for r in results) for k in ("answered", "refused", "failed")}
    return row_from_facts(
        f"database SIGKILLed mid-burst, gate {mode}",
        results,
        facts,
        began,
        [
            ", ".join(f"{v} {k}" for k, v in kinds.items() if v),
            f"{spooled.waiting} left in spool, {spooled.quarantined} quarantined",
            f"{facts['held']['n']} reservations ({facts['held']['tokens']} tokens) still held, "
            f"{facts['held']['referenced']} of them named by a ledger row: a `vtai_reserve()` "
            "that committed as the server died, whose grant never reached the app; they "
            "return to the user when `VTAI_RESERVATION_TTL` expires",
        ],
    )


async def app_kill(server, data: Path, turns: int, spacing: float, limit: int) -> Row:
    """tests/test_app_kill.py at size: SIGKILL the app once half the turns have finished."""
    began = time.monotonic()
    url, ids = await new_database(server.url, users=10, limit=limit)
    r = await kill_mid_burst(url, data, ids, limit, turns, turns // 2, spacing)
    lost = r.lost
    notes = [
        f"offered {1 / spacing:.0f} turns/s; {len(r.finished)} finished before the kill",
        f"{len(lost)} finished turns have no row "
        f"({', '.join(sorted({r.finished[c][0] for c in lost})) or 'none'}); "
        f"{r.rows_before_restart} rows were in the ledger at the kill",
    ]
    return Row(
        f"app SIGKILLed mid-burst at {1 / spacing:.0f} turns/s, restarted",
        turns,
        len(r.finished),
        len(r.finished) - len(lost),
        r.tokens_expected,
        r.tokens_found,
        max((o["used"] - limit for o in r.over_limit), default=0),
        not r.mismatches,
        r.reserved_after_expiry,
        r.duplicates,
        time.monotonic() - began,
        notes,
    )


async def provider_fault(server, provider, data: Path, mode: str, turns: int) -> tuple[Row, dict]:
    """`turns` concurrent turns against one provider behaviour; also measures how long each
    finished turn's row waits before it is committed (the window an app crash loses)."""
    began = time.monotonic()
    limit = PROVIDER_LIMIT
    url, ids = await new_database(server.url, users=10, limit=limit)
    settings = make_settings(url, data, max_tokens=32, request_timeout=2.0)
    services = await Services.start(settings, replay=False)
    runner = runner_for(services, provider.url(mode))
    finished_at: dict[str, float] = {}
    committed_at: dict[str, float] = {}
    store = services.ledger.store
    send = store.record_encoded

    async def timed_send(texts: list[str]) -> list[bool]:
        result = await send(texts)
        now = time.monotonic()
        for text in texts:
            committed_at[json.loads(text)["litellm_call_id"]] = now
        return result

    store.record_encoded = timed_send
    try:
        results = await burst(
            runner,
            ids,
            turns,
            0.01,
            lambda done: finished_at.__setitem__(done.call_id, time.monotonic()),
        )
        await settle(services, runner)
    finally:
        await services.stop()
    facts = await ledger_facts(url, {r.call_id for r in results}, limit)
    lags = [committed_at[c] - t for c, t in finished_at.items() if c in committed_at]
    kinds = sorted({r.kind for r in results})
    row = row_from_facts(
        f"provider {mode}", results, facts, began, [f"outcomes: {', '.join(kinds)}"]
    )
    return row, {"mode": mode, "lags": lags}


def machine() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return {
        "machine": (
            f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs ({cpu}), {mem}"
        ),
        "python": platform.python_version(),
    }


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms"


def render(rows: list[Row], lags: list[dict], meta: dict) -> str:
    head = (
        "| scenario | turns attempted | rows expected | rows found | tokens expected "
        "| tokens found | overshoot (tokens) | counters = ledger | reserved left | duplicate rows "
        "| seconds |\n|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|\n"
    )
    body = "".join(
        f"| {r.scenario} | {r.turns:,} | {r.rows_expected:,} | {r.rows_found:,} "
        f"| {r.tokens_expected:,} | {r.tokens_found:,} | {r.overshoot:,} "
        f"| {'yes' if r.counters_ok else '**no**'} | {r.reserved_left:,} | {r.duplicates} "
        f"| {r.seconds:.1f} |\n"
        for r in rows
    )
    notes = "".join(f"- **{r.scenario}**: {'; '.join(r.notes)}.\n" for r in rows)
    lag_lines = "".join(
        f"| provider {item['mode']} | {len(item['lags'])} | {ms(statistics.median(item['lags']))} "
        f"| {ms(sorted(item['lags'])[int(len(item['lags']) * 0.9)])} "
        f"| {ms(max(item['lags']))} |\n"
        for item in lags
        if item["lags"]
    )
    kills = [r for r in rows if r.scenario.startswith("app SIGKILLed")]
    loss = "".join(
        f"- {r.scenario}: **{r.rows_expected - r.rows_found:,} of {r.rows_expected:,}** turns "
        f"that had finished lost their row, **{r.tokens_expected - r.tokens_found:,}** tokens "
        f"never billed.\n"
        for r in kills
    )
    return f"""# Reliability under faults

Generated by `benchmarks/faults.py` on {meta["date"]}; every number on this page comes from
that run. Regenerate with:

```sh
{meta["command"]}
```

- Machine: {meta["machine"]}
- Versions: Python {meta["python"]}, PostgreSQL {meta["postgres"]} (embedded), LiteLLM
  {meta["litellm"]}, asyncpg {meta["asyncpg"]}, Chainlit {meta["chainlit"]}
- Model: the FAKE OpenAI-compatible provider in `tests/fake_provider.py` (real providers can't
  be reached from the benchmark machine), through LiteLLM's real HTTP client. It reports 11
  prompt tokens plus one completion token per word.
- App settings: `VTAI_MAX_TOKENS=32`, pool of {meta["pool_size"]} connections per process
  (the `Services.start` default), 10 users per scenario. Tier limit per user:
  {meta["kill_limit"]:,} tokens in the kill scenarios (so users reach it and get refused),
  {meta["provider_limit"]:,} in the provider scenarios. Gate open lets users overshoot by
  what they used while the database was down, as docs/metering.md says.
- Total run time: {meta["elapsed"]:.0f} s.

## Results

{head}{body}
How to read it:

- **rows expected**: one row per turn, whatever its outcome. For the app-kill rows it is the
  turns the killed process had *finished* (reported on stdout as each finished); turns in
  flight at the kill are allowed to leave no row (their reservation expires instead).
- **tokens expected**: what the turns themselves saw: the provider's usage for answers, the
  token-counter estimate of what streamed for a broken stream, 0 for refusals and failures.
- **overshoot**: the most any user's counter ended above their tier limit (0 = limit held).
- **counters = ledger**: `vtai_verify_counters()` returned nothing.
- **reserved left**: tokens still held by reservations at the end (after the TTL expiry for
  the app-kill rows).

{notes}
## The gap: an app crash loses rows of turns that had already finished

{loss}
Cause: a finished turn's row exists only in the process's memory until `vtai_record()` commits
it. The success row is built by the LiteLLM callback and the refusal/failure rows by
`TurnRunner._later`, which both call `Ledger.record` in a background task; that task then waits
for a connection from the same {meta["pool_size"]}-connection pool the gate's
`vtai_reserve()` calls use, and the writes of one user queue on that user's counter row. The
spool does not help: it only receives rows whose write *failed*, and a SIGKILLed process never
gets that far. How long a finished turn's row waited before it was committed, measured in the
provider scenarios above (same offered load as the first app-kill row):

| scenario | rows timed | median | p90 | max |
|---|---:|---:|---:|---:|
{lag_lines}
Anything that kills the process inside that window (OOM killer, `kill -9`, a container
restart, a host crash) loses those rows; their reservations expire after
`VTAI_RESERVATION_TTL` and the tokens are never billed. The limit itself still holds (no
overshoot), and nothing is ever charged twice.
"""


async def main(scale: float) -> str:
    began = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="vtai-bench-"))
    server = await asyncio.to_thread(embedded_pg.start, tmp / "pg")
    provider = FakeProvider().start()
    rows: list[Row] = []
    lags: list[dict] = []
    n = max(int(500 * scale), 40)
    try:
        await build_template(server.url, TEMPLATE)
        conn = await asyncpg.connect(server.url)
        pg_version = await conn.fetchval("show server_version")
        await conn.close()
        for mode in ("closed", "open"):
            rows.append(await db_kill(server, provider, tmp / f"db-{mode}", mode, n, KILL_LIMIT))
            print(rows[-1], flush=True)
        # Three offered loads: past what one process can serve, about at it, and well below.
        for i, spacing in enumerate((0.01, 0.05, 0.2)):
            turns = {0.01: n, 0.05: max(int(n * 0.4), 40), 0.2: 40}[spacing]
            rows.append(await app_kill(server, tmp / f"app-{i}", turns, spacing, KILL_LIMIT))
            print(rows[-1], flush=True)
        for mode in ("ok", "401", "429", "500", "hang", "break"):
            row, lag = await provider_fault(
                server, provider, tmp / f"p-{mode}", mode, max(n // 5, 20)
            )
            rows.append(row)
            lags.append(lag)
            print(row, flush=True)
    finally:
        provider.stop()
        await asyncio.to_thread(server.stop)
        shutil.rmtree(tmp, ignore_errors=True)
    meta = {
        **machine(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": ".venv/bin/python -m benchmarks.faults"
        + (f" --scale {scale}" if scale != 1 else ""),
        "postgres": pg_version,
        "litellm": version("litellm"),
        "asyncpg": version("asyncpg"),
        "chainlit": version("chainlit"),
        "pool_size": inspect.signature(Services.start).parameters["pool_size"].default,
        "elapsed": time.monotonic() - began,
        "kill_limit": KILL_LIMIT,
        "provider_limit": PROVIDER_LIMIT,
    }
    return render(rows, lags, meta)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="1.0 = 500-turn bursts")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "reliability.md")
    args = parser.parse_args()
    args.out.write_text(asyncio.run(main(args.scale)))
    print(f"wrote {args.out}")
