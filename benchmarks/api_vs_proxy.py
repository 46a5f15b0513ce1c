"""VT.ai's /v1 against LiteLLM's own proxy: what each adds over calling the provider directly.

Three servers, each one process, in front of the same mock provider (benchmarks/mock_provider.py,
a process of its own that streams CHUNKS tokens back to back and reports usage):

- direct: the client calls the mock itself; the baseline.
- LiteLLM's proxy: `litellm --config cfg.yaml` (litellm[proxy] 1.106.2 from the separate venv
  .venv-bench-proxy, `make bench-proxy-venv`), no database, a fixed master key, one worker,
  a model name routed to the mock. It meters nothing.
- VT.ai: `chainlit run vtai/main.py` with `VTAI_MODEL=openai/fake` on the mock, on the
  database (a user on an unlimited tier, an API key): every request checks the key in
  Postgres, reserves, calls LiteLLM, writes a ledger row and settles.

The same load drives all three, in alternating blocks so drift hits them alike: streamed
requests (usage asked for), each prompt different, timing the first and the last token, at
each latency level RATE@GAP (RATE 0: one request at a time, else RATE requests/s arriving at
random, open loop; GAP: the mock's milliseconds between tokens, 0 for back to back); then C
clients back to back for T seconds, tokens back to back (saturation), counting requests/s and
the server's CPU per request. The load generator is this process (aiohttp, one event loop).

    python benchmarks/api_vs_proxy.py [--db-url URL] [--levels 0@0,0@2,10@2]
        [--requests 300] [--clients 16] [--seconds 15] [--chunks 20] [--vtai-only] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import aiohttp  # noqa: E402
import asyncpg  # noqa: E402

from benchmarks import common, mock_provider  # noqa: E402
from benchmarks.common import ms, pct  # noqa: E402
from vtai.api import keys  # noqa: E402

ROOT = common.ROOT
PROXY_VENV = ROOT / ".venv-bench-proxy"
PROXY_VERSION = "1.106.2"
MASTER_KEY = "sk-bench-" + "0123456789abcdef" * 2  # the proxy refuses to start without one
QUESTION = "What is the capital of France, and what is it known for?"
MAX_TOKENS = 64
SIDES = ("direct", "proxy", "vtai")
NAMES = {"direct": "direct", "proxy": "LiteLLM proxy", "vtai": "VT.ai /v1"}
QUICK = {"levels": [(0.0, 0.0), (20.0, 2.0)], "requests": 12, "rounds": 2, "clients": 4}
QUICK |= {"seconds": 1.5, "warmup": 3}
CLK_TCK = os.sysconf("SC_CLK_TCK")


class Unavailable(Exception):
    """A server that could not be started: one line saying why."""


@dataclass
class Side:
    name: str
    url: str  # .../chat/completions
    model: str
    headers: dict
    pid: int  # the server's process (its children counted with it)
    db_pids: list[int] = field(default_factory=list)  # the database's, for VT.ai


@dataclass
class Block:
    first: list[float] = field(default_factory=list)
    last: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    cpu: float = 0.0  # the server's CPU seconds
    db_cpu: float = 0.0
    client_cpu: float = 0.0

    def add(self, other: Block) -> None:
        self.first += other.first
        self.last += other.last
        self.errors += other.errors
        self.seconds += other.seconds
        self.cpu += other.cpu
        self.db_cpu += other.db_cpu
        self.client_cpu += other.client_cpu


# --- processes ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) of these processes and all their descendants."""
    children: dict[int, list[int]] = {}
    stats: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        pid, ppid = int(entry), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        stats[pid] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    total, todo, seen = 0.0, list(pids), set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += stats.get(pid, 0.0)
        todo += children.get(pid, [])
    return total


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return " / ".join(text[-lines:])[-400:]


@contextlib.asynccontextmanager
async def process(args: list[str], log: Path, **kw):
    with log.open("w") as out:
        proc = await asyncio.create_subprocess_exec(
            *args, stdout=out, stderr=asyncio.subprocess.STDOUT, **kw
        )
        try:
            yield proc
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 20)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()


async def wait_up(url: str, proc, log: Path, headers: dict, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise Unavailable(f"{what} exited with {proc.returncode}: {_tail(log)}")
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with http.get(url, headers=headers, timeout=2) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.3)
    raise Unavailable(f"{what} did not answer {url} within {timeout:.0f} s: {_tail(log)}")


@contextlib.asynccontextmanager
async def mock(tmp: Path, chunks: int):
    args = [sys.executable, "-m", "benchmarks.mock_provider", "--chunks", str(chunks)]
    log = tmp / "mock.log"
    async with process(args + ["--port", "0"], log, cwd=ROOT) as proc:
        port, deadline = None, time.monotonic() + 30
        while port is None:
            text = log.read_text()
            if text.startswith("ready "):
                port = int(text.split()[1])
            elif proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the mock provider did not start: {_tail(log)}")
            else:
                await asyncio.sleep(0.05)
        base = f"http://127.0.0.1:{port}/v1"
        yield Side("direct", f"{base}/chat/completions", "fake", {}, proc.pid), base


def proxy_config(mock_base: str) -> str:
    return "\n".join(
        [
            "model_list:",
            "  - model_name: fake",
            "    litellm_params:",
            "      model: openai/fake",
            f"      api_base: {mock_base}",
            "      api_key: sk-mock-not-a-real-key",
            "general_settings:",
            f"  master_key: {MASTER_KEY}",
            "",
        ]
    )


@contextlib.asynccontextmanager
async def proxy(tmp: Path, mock_base: str, venv: Path):
    exe = venv / "bin" / "litellm"
    if not exe.exists():
        raise Unavailable(f"{exe.relative_to(ROOT)} is absent: run `make bench-proxy-venv`")
    cfg = tmp / "proxy.yaml"
    cfg.write_text(proxy_config(mock_base))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VTAI_", "OPENAI_"))}
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_TELEMETRY="False")
    env.pop("DATABASE_URL", None)
    log = tmp / "proxy.log"
    args = [str(exe), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port)]
    async with process(args + ["--num_workers", "1"], log, cwd=tmp, env=env) as proc:
        base = f"http://127.0.0.1:{port}/v1"
        headers = {"Authorization": f"Bearer {MASTER_KEY}"}
        await wait_up(f"{base}/models", proc, log, headers, "LiteLLM's proxy")
        yield Side("proxy", f"{base}/chat/completions", "fake", headers, proc.pid)


@contextlib.asynccontextmanager
async def vtai(tmp: Path, mock_base: str, db_url: str, key: str):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VTAI_", "SUPABASE_"))}
    env.pop("CI", None)  # chainlit would plant a fake OPENAI_API_KEY in --ci mode
    env.update(
        VTAI_DATABASE_URL=db_url,
        VTAI_DATA_DIR=str(tmp / "vtai"),
        CHAINLIT_AUTH_SECRET="bench-secret-" + "x" * 40,
        VTAI_MODEL="openai/fake",
        OPENAI_API_BASE=mock_base,
        OPENAI_BASE_URL=mock_base,
        OPENAI_API_KEY="sk-mock-not-a-real-key",
        LITELLM_LOCAL_MODEL_COST_MAP="True",
    )
    log = tmp / "vtai.log"
    args = [sys.executable, "-m", "chainlit", "run", str(ROOT / "vtai" / "main.py"), "--headless"]
    args += ["--host", "127.0.0.1", "--port", str(port)]
    async with process(args, log, cwd=ROOT, env=env) as proc:
        base = f"http://127.0.0.1:{port}/v1"
        headers = {"Authorization": f"Bearer {key}"}
        await wait_up(f"{base}/models", proc, log, headers, "VT.ai")
        yield Side("vtai", f"{base}/chat/completions", "openai/fake", headers, proc.pid)


async def postmaster_pids(conn: asyncpg.Connection) -> list[int]:
    """The database server's postmaster, when it runs on this machine: its CPU (and its
    backends', which are its children) is part of what metering costs."""
    return _parent_if_postgres(await conn.fetchval("select pg_backend_pid()"))


def _parent_if_postgres(pid: int) -> list[int]:
    with contextlib.suppress(OSError, IndexError, ValueError):
        text = Path(f"/proc/{pid}/stat").read_text()
        if "postgres" in text.split(")", 1)[0]:
            return [int(text.rsplit(")", 1)[1].split()[1])]
    return []


# --- load -----------------------------------------------------------------------------------


def body(side: Side, gap_ms: float) -> dict:
    tag = f"{uuid.uuid4().hex} [gap {gap_ms:g}]"  # the mock's pause between tokens
    return {
        "model": side.model,
        "messages": [{"role": "user", "content": f"{QUESTION} ({tag})"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": MAX_TOKENS,
    }


async def one(http, side: Side, expected: str, out: Block, gap_ms: float = 0.0) -> None:
    """One streamed request: its times to the first and the last token go into `out`."""
    pieces, first, last, usage = [], None, None, None
    t0 = time.perf_counter()
    try:
        async with http.post(side.url, json=body(side, gap_ms), headers=side.headers) as r:
            if r.status != 200:
                out.errors.append(f"HTTP {r.status}: {(await r.text())[:200]}")
                return
            async for line in r.content:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        last = time.perf_counter()
                        first = first or last
                        pieces.append(text)
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        out.errors.append(f"{type(exc).__name__}: {exc}"[:200])
        return
    answer = "".join(pieces)
    if answer != expected or not usage or usage.get("completion_tokens") != expected.count(" ") + 1:
        out.errors.append(f"wrong answer {answer[:60]!r} or usage {usage}")
        return
    out.first.append(first - t0)
    out.last.append(last - t0)


@contextlib.contextmanager
def metered(side: Side, out: Block):
    cpu, db, client = cpu_seconds([side.pid]), cpu_seconds(side.db_pids), time.process_time()
    t0 = time.perf_counter()
    yield
    out.seconds += time.perf_counter() - t0
    out.cpu += cpu_seconds([side.pid]) - cpu
    out.db_cpu += cpu_seconds(side.db_pids) - db if side.db_pids else 0.0
    out.client_cpu += time.process_time() - client


async def latency_block(http, side: Side, expected: str, n: int, rate: float, gap: float):
    """n requests: one at a time (rate 0), or arriving at random at `rate` per second."""
    out = Block()
    with metered(side, out):
        if rate <= 0:
            for _ in range(n):
                await one(http, side, expected, out, gap)
        else:
            tasks, due = [], time.perf_counter()
            for _ in range(n):
                tasks.append(asyncio.create_task(one(http, side, expected, out, gap)))
                due += random.expovariate(rate)
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
            await asyncio.gather(*tasks)
    return out


async def saturation_block(http, side: Side, expected: str, clients: int, seconds: float):
    """`clients` clients, each sending its next request when the last ends, for `seconds`."""
    out = Block()
    stop = time.perf_counter() + seconds

    async def client() -> None:
        while time.perf_counter() < stop:
            await one(http, side, expected, out)

    with metered(side, out):
        await asyncio.gather(*(client() for _ in range(clients)))
    return out


# --- the benchmark ----------------------------------------------------------------------------


async def bench(
    db_url: str,
    levels: list[tuple[float, float]],
    requests: int,
    clients: int,
    seconds: float,
    chunks: int = 20,
    rounds: int = 4,
    warmup: int = 30,
    vtai_only: bool = False,
    proxy_venv: Path = PROXY_VENV,
) -> common.Section:
    expected = "".join(mock_provider.answer(chunks))
    data: dict = {
        "chunks": chunks,
        "rounds": rounds,
        "level_spec": levels,
        "requests": requests,
    }
    data |= {"clients": clients, "seconds": seconds, "vtai_only": vtai_only}
    conn = await asyncpg.connect(db_url)
    try:
        (user,) = await common.add_users(conn, 1)
        _, key = await keys.create(conn, user, "bench", actor="bench")
        db_pids = await postmaster_pids(conn)
        rows_before = await conn.fetchval("select count(*) from request_logs")
    finally:
        await conn.close()
    with common.data_dir() as tmp:
        async with contextlib.AsyncExitStack() as stack:
            direct, mock_base = await stack.enter_async_context(mock(tmp, chunks))
            sides = {"direct": direct}
            if vtai_only:
                data["proxy_unavailable"] = "not run (--vtai-only)"
            else:
                try:
                    sides["proxy"] = await stack.enter_async_context(
                        proxy(tmp, mock_base, proxy_venv)
                    )
                except Unavailable as exc:
                    data["proxy_unavailable"] = str(exc)
                    print(f"LiteLLM's proxy unavailable: {exc}", flush=True)
            sides["vtai"] = await stack.enter_async_context(vtai(tmp, mock_base, db_url, key))
            sides["vtai"].db_pids = db_pids
            connector = aiohttp.TCPConnector(limit=0, force_close=False)
            timeout = aiohttp.ClientTimeout(total=60)
            http = await stack.enter_async_context(
                aiohttp.ClientSession(connector=connector, timeout=timeout)
            )
            vtai_requests = 0
            for name, side in sides.items():
                warm = await latency_block(http, side, expected, warmup, 0, 0)
                warm.add(await saturation_block(http, side, expected, 4, 0.5))
                if warm.errors:
                    raise RuntimeError(f"{NAMES[name]} failed while warming up: {warm.errors[0]}")
                vtai_requests += len(warm.first) if name == "vtai" else 0
            measured: dict[str, dict[str, Block]] = {}
            for rate, gap in levels:
                blocks = {name: Block() for name in sides}
                for _ in range(rounds):
                    for name, side in sides.items():
                        n = max(1, requests // rounds)
                        block = await latency_block(http, side, expected, n, rate, gap)
                        blocks[name].add(block)
                        await asyncio.sleep(0.2)
                measured[level_label(rate, gap)] = blocks
            saturated = {name: Block() for name in sides}
            for _ in range(max(1, rounds // 2)):
                for name, side in sides.items():
                    block = await saturation_block(
                        http, side, expected, clients, seconds / max(1, rounds // 2)
                    )
                    saturated[name].add(block)
                    await asyncio.sleep(0.5)
            vtai_requests += sum(
                len(b["vtai"].first) + len(b["vtai"].errors) for b in measured.values()
            )
            vtai_requests += len(saturated["vtai"].first) + len(saturated["vtai"].errors)
            logs = {name: _tail(tmp / f"{name}.log", 5) for name in ("proxy", "vtai")}
    conn = await asyncpg.connect(db_url)
    try:
        data["vtai_requests"] = vtai_requests
        data["vtai_rows"] = await wait_rows(conn, rows_before + vtai_requests) - rows_before
        data["vtai_rows_by_source"] = dict(
            await conn.fetch("select source, count(*) from request_logs group by source")
        )
        data["counters_exact"] = await common.counters_exact(conn)
        data["reserved"] = await conn.fetchval(
            "select coalesce(sum(reserved), 0) from usage_counters"
        )
    finally:
        await conn.close()
    data["logs"] = logs
    return summarize(measured, saturated, data)


async def wait_rows(conn: asyncpg.Connection, n: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while True:
        count = await conn.fetchval("select count(*) from request_logs")
        if count >= n or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.1)


def level_label(rate: float, gap: float) -> str:
    load = "one at a time" if rate <= 0 else f"{rate:g} req/s"
    return load + (", tokens back to back" if gap <= 0 else f", a token every {gap:g} ms")


def stats(b: Block) -> dict:
    n = len(b.first)
    return {
        "requests": n,
        "errors": len(b.errors),
        "first_error": b.errors[0] if b.errors else None,
        "rps": n / b.seconds if b.seconds else float("nan"),
        "cpu_per_request": b.cpu / n if n else float("nan"),
        "db_cpu_per_request": b.db_cpu / n if n else float("nan"),
        "client_cpu_per_request": b.client_cpu / n if n else float("nan"),
        "first_p50": pct(b.first, 50),
        "first_p99": pct(b.first, 99),
        "last_p50": pct(b.last, 50),
        "last_p99": pct(b.last, 99),
    }


METRICS = ("first_p50", "first_p99", "last_p50", "last_p99")


def ratio(vtai_value: float, proxy_value: float) -> str:
    if proxy_value <= 0 or vtai_value != vtai_value or proxy_value != proxy_value:
        return "n/a"
    return f"{vtai_value / proxy_value:.2f}x"


def cpu_cell(d: dict) -> str:
    cell = ms(d["cpu_per_request"])
    if d["db_cpu_per_request"] > 0:
        cell += f" + {ms(d['db_cpu_per_request'])} db"
    return cell


def summarize(levels: dict, saturated: dict, data: dict) -> common.Section:
    rows, targets = [], []
    data["levels"] = {}
    proxy_missing = data.get("proxy_unavailable")
    for label, blocks in levels.items():
        d = {name: stats(b) for name, b in blocks.items()}
        for name in d:
            for m in METRICS:
                d[name][f"added_{m}"] = d[name][m] - d["direct"][m]
        data["levels"][label] = d
        for name in SIDES:
            if name not in d:
                continue
            s = d[name]
            added = ["—"] * 4 if name == "direct" else [ms(s[f"added_{m}"]) for m in METRICS]
            rows.append(
                [label, NAMES[name], f"{s['requests']:,}", f"{s['rps']:.1f}", cpu_cell(s)]
                + [ms(s[m]) for m in METRICS]
                + added
            )
        if "proxy" in d:
            v, p = d["vtai"], d["proxy"]
            rows.append(
                [label, "VT.ai ÷ proxy (added)", "", "", ""]
                + [""] * 4
                + [ratio(v[f"added_{m}"], p[f"added_{m}"]) for m in METRICS]
            )
        if not data["vtai_only"]:
            for m in METRICS:
                what = f"{m.split('_')[1]} to the {m.split('_')[0]} token"
                goal = "VT.ai adds less than the proxy"
                if "proxy" in d:
                    v, p = d["vtai"][f"added_{m}"], d["proxy"][f"added_{m}"]
                    measured = f"VT.ai {ms(v)} ms, proxy {ms(p)} ms ({ratio(v, p)})"
                    why = "VT.ai's added time is more than the proxy's"
                    targets.append(
                        common.Target(f"added {what}, {label}", goal, measured, v < p, why)
                    )
                else:
                    targets.append(
                        common.Target(f"added {what}, {label}", goal, "n/a", False, proxy_missing)
                    )
    sat = {name: stats(b) for name, b in saturated.items()}
    data["saturation"] = sat
    label = f"saturation, {data['clients']} clients, tokens back to back"
    for name in SIDES:
        if name in sat:
            s = sat[name]
            rows.append(
                [label, NAMES[name], f"{s['requests']:,}", f"{s['rps']:.1f}", cpu_cell(s)]
                + [ms(s[m]) for m in METRICS]
                + ["—"] * 4
            )
    if "proxy" in sat:
        rps = sat["vtai"]["rps"] / sat["proxy"]["rps"]
        cpu = sat["vtai"]["cpu_per_request"] / sat["proxy"]["cpu_per_request"]
        rows.append([label, "VT.ai ÷ proxy", "", f"{rps:.2f}x", f"{cpu:.2f}x"] + [""] * 8)
    data["errors"] = sum(s["errors"] for d in data["levels"].values() for s in d.values())
    data["errors"] += sum(s["errors"] for s in sat.values())
    errors = [
        f"{NAMES[n]}: {s['errors']} ({s['first_error']})"
        for d in [*data["levels"].values(), sat]
        for n, s in d.items()
        if s["errors"]
    ]
    notes = notes_for(data, errors)
    columns = [
        "load", "side", "requests", "req/s", "server CPU ms/req",
        "first token p50", "first token p99", "last token p50", "last token p99",
        "added first p50", "added first p99", "added last p50", "added last p99",
    ]  # fmt: skip
    spec = ",".join(f"{r:g}@{g:g}" for r, g in data["level_spec"])
    command = (
        f"python benchmarks/api_vs_proxy.py --levels {spec} --requests {data['requests']}"
        f" --clients {data['clients']} --seconds {data['seconds']:g} --chunks {data['chunks']}"
        + (" --vtai-only" if data["vtai_only"] else "")
    )
    return common.Section(
        "VT.ai /v1 against LiteLLM's proxy", command, columns, rows, notes, targets, data
    )


def notes_for(data: dict, errors: list[str]) -> list[str]:
    notes = [
        "The same streamed request to each side (usage asked for, max_tokens "
        f"{MAX_TOKENS}, every prompt different); the mock answers {data['chunks']} tokens. "
        "Tokens back to back: the whole answer arrives at once, so the added time to the last "
        "token is the side's whole cost per request, chunks included. A token every N ms: a "
        "(fast) streaming provider, whose pauses hide most of the per-chunk cost, so the first "
        "token shows the path before the call and the last token what follows the last chunk. "
        "Times in ms, from sending the request to the first and to the last token read by the "
        "client; added = the side's percentile minus direct's at the same load, measured in "
        f"{data['rounds']} alternating blocks per side. One at a time: the next request when "
        "the last ends (no queueing: what the server's own path adds); N req/s: arrivals at "
        "random (Poisson), open loop. Saturation: the given clients back to back for "
        f"{data['seconds']:g} s per side; its req/s is that side's ceiling on one process.",
        "Direct: the client calls the mock provider (benchmarks/mock_provider.py, aiohttp, its "
        "own process). LiteLLM proxy: `litellm --config` from litellm[proxy] "
        f"{PROXY_VERSION} in .venv-bench-proxy, one uvicorn worker (on uvloop, which that venv "
        "has), no database, a fixed master key (the key check is a string comparison), "
        "nothing metered. VT.ai /v1: `chainlit run vtai/main.py` (one process, asyncio's "
        "loop), the key looked up in Postgres, `vtai_reserve`, the LiteLLM call (the same "
        "litellm 1.106.2), the ledger row and the settle, all on every request.",
        "Server CPU ms/req: the server process's CPU time per request over the blocks "
        "(direct: the mock's, which every side pays as well); for VT.ai, `+ db` is the "
        "PostgreSQL server's (its postmaster and backends) per request. The load generator "
        "(this process) and the mock share the same 2 cores: direct's req/s is their own "
        "ceiling, above which no side can be measured.",
        f"VT.ai ledger rows: {data['vtai_rows']:,} of {data['vtai_requests']:,} requests; "
        f"counters equal the ledger: {data['counters_exact']}; tokens still reserved: "
        f"{data['reserved']}.",
    ]
    burst = data["levels"].get(level_label(0, 0), {})
    if "vtai" in burst and burst["vtai"]["first_p50"] >= 0.8 * burst["vtai"]["last_p50"]:
        v = burst["vtai"]
        notes.append(
            "With the tokens back to back, VT.ai's first token left with its last (p50 "
            f"{ms(v['first_p50'])} and {ms(v['last_p50'])} ms), so its added time to the first "
            "token there is its whole path. Most likely because /v1 runs the turn in a task of "
            "its own that hands tokens over a queue (vtai/api/routes.py `Turn`): LiteLLM reads "
            "an answer that has already arrived to its end without yielding, and the response "
            "writes only then. With a pause between tokens, as any real provider has, the "
            "first token leaves first (the other rows)."
        )
    if data.get("proxy_unavailable"):
        notes.append(f"LiteLLM's proxy: unavailable ({data['proxy_unavailable']}).")
    notes.append(
        "To reproduce: `make bench-proxy-venv` (LiteLLM's proxy in a venv of its own, from "
        "benchmarks/requirements-proxy.txt), then the command above; `make bench` does both "
        "and every other section; `python benchmarks/run_all.py --only api_vs_proxy --merge` "
        "re-runs this section into docs/performance.md alone."
    )
    notes.append("Failed requests: " + ("; ".join(errors) if errors else "none") + ".")
    return notes


def parse_levels(text: str) -> list[tuple[float, float]]:
    """'0@0,10@2' -> [(0.0, 0.0), (10.0, 2.0)]: requests/s (0: one at a time) @ ms per token."""
    levels = []
    for part in text.split(","):
        rate, _, gap = part.strip().partition("@")
        try:
            level = (float(rate), float(gap or 0))
        except ValueError:
            level = (-1.0, -1.0)
        if level[0] < 0 or level[1] < 0:
            raise argparse.ArgumentTypeError(f"{part.strip()!r} is not RATE@GAP_MS, e.g. 10@2")
        levels.append(level)
    return levels


async def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--levels", type=parse_levels, default="0@0,0@2,10@2",
                   help="latency levels RATE@GAP: req/s (0: one at a time) @ ms between "
                   "the mock's tokens (0: back to back)")  # fmt: skip
    p.add_argument("--requests", type=int, default=300, help="per side per latency level")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients at saturation")
    p.add_argument("--seconds", type=float, default=15, help="saturation time per side")
    p.add_argument("--chunks", type=int, default=20, help="tokens in the mock's answer")
    p.add_argument("--rounds", type=int, default=4, help="alternating blocks per side")
    p.add_argument("--vtai-only", action="store_true", help="leave LiteLLM's proxy out")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs")
    p.add_argument("--proxy-venv", type=Path, default=PROXY_VENV)
    args = p.parse_args()
    sizes = dict(levels=args.levels, requests=args.requests, clients=args.clients)
    sizes |= dict(seconds=args.seconds, rounds=args.rounds, warmup=30)
    if args.quick:
        sizes = dict(QUICK)
    async with common.database(args.db_url) as url:
        result = await bench(
            url,
            chunks=args.chunks,
            vtai_only=args.vtai_only,
            proxy_venv=args.proxy_venv,
            **sizes,
        )
    common.finish(result, args.json)


if __name__ == "__main__":
    asyncio.run(main())
