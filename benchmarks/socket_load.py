"""Chats through the real server: K concurrent sessions over Chainlit's socket.io protocol.

Each simulated person logs in over HTTP (`POST /login`), opens a chat on `/ws/socket.io` with
the cookie, sends a message, reads the streamed tokens, thinks, and sends the next, with
python-socketio's client (tests/chainlit_client.py), the way a browser's messages arrive.
Two servers, the same load, one server at a time:

- VT.ai as shipped: `chainlit run vtai/main.py` on the database (a user each, on a tier no
  one reaches), metering, ledger, history and guards all on;
- bare: `chainlit run benchmarks/bare_app/app.py`, the same LiteLLM call streamed with none of
  VT.ai (no metering, ledger or history).

Both call a mock OpenAI-compatible provider in its own process with a fixed first-token
latency and token rate (benchmarks/mock_provider.py, plus the latency here). A level `K@S`
is K chats, each sending a message about every S seconds (people pacing; the first message
at a random moment in the first S seconds). Saturation: C chats back to back, no pause,
against 1 and against P app processes on one database behind HAProxy (each chat sticks to one
process by the balancer's cookie, as a browser does).

    python benchmarks/socket_load.py [--db-url URL] [--levels 50@20,200@20,500@20]
        [--seconds 60] [--saturation-chats 100] [--saturation-seconds 20] [--processes 3]
        [--chunks 40] [--gap-ms 20] [--latency-ms 300]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import aiohttp  # noqa: E402
import asyncpg  # noqa: E402
import socketio  # noqa: E402
from aiohttp import web  # noqa: E402

from benchmarks import common, mock_provider  # noqa: E402
from benchmarks.api_vs_proxy import (  # noqa: E402
    Unavailable,
    _tail,
    cpu_seconds,
    free_port,
    postmaster_pids,
    process,
)
from benchmarks.common import ms, pct  # noqa: E402
from tests.chainlit_client import ChatClient, login  # noqa: E402
from vtai.cluster import haproxy  # noqa: E402

ROOT = common.ROOT
PASSWORD = "socket-load-password"
AUTH_SECRET = "bench-socket-load-" + "y" * 40
SIDES = ("vtai", "bare")
NAMES = {"vtai": "VT.ai", "bare": "bare Chainlit"}
TURN_TIMEOUT = 60.0
# The in-process local model (SmolLM2-135M through xllamacpp), on both servers; its answers
# are capped at LOCAL_MAX_TOKENS so a turn's length doesn't swing with the sampled text.
LOCAL_MODEL = "local/smollm2-135m"
LOCAL_MAX_TOKENS = 48
CONNECT_ATTEMPTS = 3
# side -> chats whose socket.io connection had to be opened again
CONNECT_RETRIES: dict[str, int] = {}
# The load generator may use at most this share of one core at a level, else the level is
# not reported (its own queueing would be measured, not the server's).
CLIENT_CPU_CAP = 0.5


# --- the mock provider with a first-token latency ------------------------------------------


def serve_mock(port: int, chunks: int, gap_ms: float, latency_ms: float) -> None:
    """benchmarks/mock_provider.py's app, each request held `latency_ms` before it answers."""

    @web.middleware
    async def latency(request, handler):
        if latency_ms:
            await asyncio.sleep(latency_ms / 1000)
        return await handler(request)

    async def run() -> None:
        app = mock_provider.build_app(chunks, gap_ms / 1000)
        app.middlewares.append(latency)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port, backlog=4096)
        await site.start()
        print(f"ready {runner.addresses[0][1]}", flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


@contextlib.asynccontextmanager
async def mock(tmp: Path, chunks: int, gap_ms: float, latency_ms: float):
    args = [sys.executable, "-m", "benchmarks.socket_load", "--serve-mock", "--port", "0"]
    args += ["--chunks", str(chunks), "--gap-ms", str(gap_ms), "--latency-ms", str(latency_ms)]
    log = tmp / "mock.log"
    async with process(args, log, cwd=ROOT) as proc:
        deadline = time.monotonic() + 30
        while not log.read_text().startswith("ready "):
            if proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the mock provider did not start: {_tail(log)}")
            await asyncio.sleep(0.05)
        port = int(log.read_text().split()[1])
        yield f"http://127.0.0.1:{port}/v1", proc.pid


# --- the servers ---------------------------------------------------------------------------


@dataclass
class App:
    side: str
    bases: list[str]  # one per process, or the balancer's alone
    pids: list[int]  # the app processes' and the balancer's
    processes: int = 1
    # behind HAProxy: each chat first gets the balancer's sticky cookie, as a browser does
    balanced: bool = False


def app_env(mock_base: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VTAI_", "SUPABASE_"))}
    env.pop("CI", None)  # chainlit would plant a fake OPENAI_API_KEY in --ci mode
    env.update(
        CHAINLIT_AUTH_SECRET=AUTH_SECRET,
        OPENAI_API_BASE=mock_base,
        OPENAI_BASE_URL=mock_base,
        OPENAI_API_KEY="sk-mock-not-a-real-key",
        LITELLM_LOCAL_MODEL_COST_MAP="True",
    )
    return env


async def wait_http(base: str, proc, log: Path, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise Unavailable(f"{what} exited with {proc.returncode}: {_tail(log)}")
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with http.get(f"{base}/auth/config", timeout=2) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.3)
    raise Unavailable(f"{what} did not answer {base} within {timeout:.0f} s: {_tail(log)}")


@contextlib.asynccontextmanager
async def app(
    side: str,
    tmp: Path,
    mock_base: str,
    db_url: str | None,
    processes: int = 1,
    model: str = "openai/fake",
):
    """`processes` app processes of one side, each on its own port (and data dir)."""
    async with contextlib.AsyncExitStack() as stack:
        bases, procs = [], []
        for i in range(processes):
            port = free_port()
            env = app_env(mock_base)
            if side == "vtai":
                env.update(
                    VTAI_DATABASE_URL=db_url,
                    VTAI_DATA_DIR=str(tmp / f"vtai-{i}-{model.replace('/', '-')}"),
                    VTAI_MODEL=model,
                )
                if model == LOCAL_MODEL:
                    env["VTAI_MAX_TOKENS"] = str(LOCAL_MAX_TOKENS)
                if processes > 1:
                    env["VTAI_TRUSTED_PROXIES"] = "127.0.0.1"  # behind the balancer
                target = ROOT / "vtai" / "main.py"
            else:
                env.update(BARE_MODEL=model, BARE_PASSWORD=PASSWORD)
                if model == LOCAL_MODEL:
                    env["BARE_MAX_TOKENS"] = str(LOCAL_MAX_TOKENS)
                target = ROOT / "benchmarks" / "bare_app" / "app.py"
            args = [sys.executable, "-m", "chainlit", "run", str(target), "--headless"]
            args += ["--host", "127.0.0.1", "--port", str(port)]
            log = tmp / f"{side}-{i}.log"
            proc = await stack.enter_async_context(process(args, log, cwd=ROOT, env=env))
            procs.append((proc, log))
            bases.append(f"http://127.0.0.1:{port}")
        for base, (proc, log) in zip(bases, procs, strict=True):
            await wait_http(base, proc, log, NAMES[side])
        pids = [p.pid for p, _ in procs]
        if processes == 1:
            yield App(side, bases, pids)
            return
        ports = [int(b.rsplit(":", 1)[1]) for b in bases]
        lb, lb_pid = await stack.enter_async_context(balancer(tmp, side, ports))
        yield App(side, [lb], [*pids, lb_pid], processes, balanced=True)


@contextlib.asynccontextmanager
async def balancer(tmp: Path, side: str, ports: list[int]):
    """HAProxy in front of the processes, with the config `make run WORKERS=N` writes
    (vtai.cluster.haproxy): round robin, an inserted sticky cookie, health checks."""
    binary = haproxy.binary()
    if binary is None:
        raise Unavailable(f"HAProxy is not installed: {haproxy.INSTALL}")
    port = free_port()
    text = haproxy.config("127.0.0.1", port, ports)
    if side == "bare":
        text = text.replace("GET /healthz", "GET /auth/config")  # the bare app has no /healthz
    path = tmp / f"haproxy-{side}.cfg"
    path.write_text(text)
    log = tmp / f"haproxy-{side}.log"
    async with process([binary, "-db", "-f", str(path)], log) as proc:
        base = f"http://127.0.0.1:{port}"
        await wait_http(base, proc, log, "HAProxy")
        yield base, proc.pid


async def sticky(base: str, n: int) -> list[str]:
    """The balancer's cookie for n new browsers: each its first answer's Set-Cookie."""
    out = []
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        for _ in range(n):
            async with http.get(f"{base}/auth/config") as r:
                out.append(r.cookies[haproxy.COOKIE].value)
    return out


# --- the people ----------------------------------------------------------------------------


@dataclass
class Turns:
    first: list[float] = field(default_factory=list)
    last: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    server_cpu: float = 0.0
    db_cpu: float = 0.0
    client_cpu: float = 0.0


class Person(ChatClient):
    """A chat that times its own turns: the first and the last streamed token of each."""

    def __init__(self, base: str, token: str):
        super().__init__(base, token)
        self.waiting: asyncio.Future | None = None
        self.first = self.last = 0.0
        self.tokens: list[str] = []
        self.sent_at = 0.0
        self.started = False

    async def _on_any(self, event: str, data=None):
        if self.waiting is None:
            await super()._on_any(event, data)
            return
        if event in ("stream_start", "stream_token") and isinstance(data, dict):
            # The first token arrives inside stream_start (as the message's output so far).
            token = data.get("token" if event == "stream_token" else "output") or ""
            if token:
                now = time.perf_counter()
                self.first = self.first or now
                self.last = now
                self.tokens.append(token)
        elif event == "task_start":
            self.started = True
        elif event == "task_end" and self.started and not self.waiting.done():
            # Only the end of this message's task: a late one of the last turn's is not it.
            self.waiting.set_result(None)

    async def turn(self, text: str) -> tuple[float, float, str]:
        """Send `text`; (to the first token, to the last token, the streamed answer)."""
        self.first = self.last = 0.0
        self.tokens = []
        self.started = False
        self.waiting = asyncio.get_running_loop().create_future()
        self.sent_at = time.perf_counter()
        await self.sio.emit("client_message", self._message(text, "user_message"))
        try:
            await asyncio.wait_for(asyncio.shield(self.waiting), TURN_TIMEOUT)
        finally:
            self.waiting = None
        if not self.first:
            return 0.0, 0.0, ""
        return self.first - self.sent_at, self.last - self.sent_at, "".join(self.tokens)


async def log_in(bases: list[str], names: list[str], concurrency: int = 4) -> list[str]:
    """One token per name (each password login runs once on its process: argon2 on VT.ai)."""
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int, name: str) -> str:
        async with gate:
            return await login(bases[i % len(bases)], name, PASSWORD)

    return list(await asyncio.gather(*(one(i, n) for i, n in enumerate(names))))


async def open_chats(server: App, tokens: list[str], concurrency: int = 16) -> list[Person]:
    gate = asyncio.Semaphore(concurrency)
    bases = server.bases
    if server.balanced:
        # The access token cookie plus the balancer's: one Cookie header, as a browser sends.
        nodes = await sticky(bases[0], len(tokens))
        tokens = [f"{t}; {haproxy.COOKIE}={node}" for t, node in zip(tokens, nodes, strict=True)]

    async def one(i: int, token: str) -> Person:
        async with gate:
            for attempt in range(CONNECT_ATTEMPTS):
                p = Person(bases[i % len(bases)], token)
                try:
                    await p.connect()
                    return p
                except socketio.exceptions.ConnectionError:
                    # A process just started can miss the 10 s namespace wait on a loaded
                    # machine; counted, and said in the notes.
                    await p.close()
                    if attempt == CONNECT_ATTEMPTS - 1:
                        raise
                    CONNECT_RETRIES[server.side] = CONNECT_RETRIES.get(server.side, 0) + 1

    return list(await asyncio.gather(*(one(i, t) for i, t in enumerate(tokens))))


async def close_chats(people: list[Person]) -> None:
    await asyncio.gather(*(p.close() for p in people), return_exceptions=True)


async def warm_up(server: App, tokens: list[str], expected: str | None) -> None:
    """A few turns on each process first: its first call imports and connects lazily."""
    people = await open_chats(server, tokens[: 2 * server.processes])
    try:
        await drive(people, 3.0, 0, expected)
    finally:
        await close_chats(people)


async def measure(
    server: App,
    tokens: list[str],
    seconds: float,
    think: float,
    db_pids: list[int],
    expected: str | None,
) -> dict:
    """Open one chat per token, drive them, close them: the turns' stats."""
    people = await open_chats(server, tokens)
    timing = Turns()
    try:
        with metered(timing, server.pids, db_pids):
            out = await drive(people, seconds, think, expected)
    finally:
        await close_chats(people)
    out.seconds, out.server_cpu = timing.seconds, timing.server_cpu
    out.db_cpu, out.client_cpu = timing.db_cpu, timing.client_cpu
    return stats(out)


@contextlib.contextmanager
def metered(out: Turns, pids: list[int], db_pids: list[int]):
    cpu, db, client = cpu_seconds(pids), cpu_seconds(db_pids), time.process_time()
    t0 = time.perf_counter()
    yield
    out.seconds += time.perf_counter() - t0
    out.server_cpu += cpu_seconds(pids) - cpu
    out.db_cpu += cpu_seconds(db_pids) - db if db_pids else 0.0
    out.client_cpu += time.process_time() - client


async def drive(people: list[Person], seconds: float, think: float, expected: str | None) -> Turns:
    """Each person sends, reads, thinks about `think` s (0: back to back), until `seconds`.
    `expected`: the mock's answer; None (a real model) takes any answer that isn't empty."""
    out = Turns()
    stop = time.perf_counter() + seconds

    async def person(p: Person) -> None:
        if think:
            await asyncio.sleep(random.uniform(0, think))
        while time.perf_counter() < stop:
            try:
                first, last, answer = await p.turn(f"Tell me something ({uuid.uuid4().hex})")
            except TimeoutError:
                out.errors.append(f"no answer within {TURN_TIMEOUT:.0f} s")
                return
            except Exception as exc:
                out.errors.append(f"{type(exc).__name__}: {exc}"[:200])
                return
            if (answer != expected) if expected is not None else not answer:
                out.errors.append(f"wrong answer {answer[:60]!r}")
            else:
                out.first.append(first)
                out.last.append(last)
            if think:
                await asyncio.sleep(think * random.uniform(0.5, 1.5))

    await asyncio.gather(*(person(p) for p in people))
    return out


def stats(t: Turns) -> dict:
    n = len(t.first)
    return {
        "turns": n,
        "errors": len(t.errors),
        "first_error": t.errors[0] if t.errors else None,
        "turns_per_s": n / t.seconds if t.seconds else float("nan"),
        "server_cpu_per_turn": t.server_cpu / n if n else float("nan"),
        "db_cpu_per_turn": t.db_cpu / n if n else float("nan"),
        "client_cores": t.client_cpu / t.seconds if t.seconds else float("nan"),
        "server_cores": t.server_cpu / t.seconds if t.seconds else float("nan"),
        "first_p50": pct(t.first, 50),
        "first_p99": pct(t.first, 99),
        "last_p50": pct(t.last, 50),
        "last_p99": pct(t.last, 99),
    }


# --- the benchmark -------------------------------------------------------------------------


async def add_people(db_url: str, n: int) -> list[str]:
    """n VT.ai users on the bench tier, all with PASSWORD (hashed once, stored n times)."""
    from vtai.db import accounts

    hashed = await asyncio.to_thread(accounts._hasher.hash, PASSWORD)
    tag = uuid.uuid4().hex[:6]
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch(
            "insert into profiles (username, tier) select 'load-' || $1 || '-' || g, $2"
            " from generate_series(1, $3) g returning id, username",
            tag,
            common.BENCH_TIER,
            n,
        )
        await conn.execute(
            "insert into vtai_private.credentials (profile_id, password_hash)"
            " select unnest($1::uuid[]), $2",
            [r["id"] for r in rows],
            hashed,
        )
    finally:
        await conn.close()
    return sorted(r["username"] for r in rows)


async def bench(
    db_url: str,
    levels: list[tuple[int, float]],
    seconds: float,
    saturation_chats: int,
    saturation_seconds: float,
    processes: int = 3,
    chunks: int = 40,
    gap_ms: float = 20.0,
    latency_ms: float = 300.0,
    local: tuple[int, float] | None = None,
    local_seconds: float = 60.0,
) -> common.Section:
    """`local`: a level K@S run again with the local model on both servers (None: not run)."""
    expected = "".join(mock_provider.answer(chunks))
    most = max([n for n, _ in levels] + [saturation_chats])
    names = await add_people(db_url, most)
    conn = await asyncpg.connect(db_url)
    try:
        db_pids = await postmaster_pids(conn)
        rows_before = await conn.fetchval("select count(*) from request_logs")
    finally:
        await conn.close()
    data: dict = {
        "levels": {},
        "saturation": {},
        "skipped": {},
        "chunks": chunks,
        "gap_ms": gap_ms,
        "latency_ms": latency_ms,
        "seconds": seconds,
        "processes": processes,
        "saturation_chats": saturation_chats,
        "saturation_seconds": saturation_seconds,
        "level_spec": levels,
        "local": {},
        "local_spec": local,
        "local_seconds": local_seconds,
    }
    vtai_turns = 0
    logged_in: dict[str, list[str]] = {}
    with common.data_dir() as tmp:
        async with mock(tmp, chunks, gap_ms, latency_ms) as (mock_base, mock_pid):
            data["mock_pid"] = mock_pid
            for procs in (1, processes) if processes > 1 else (1,):
                for side in SIDES:
                    async with app(side, tmp, mock_base, db_url, procs) as server:
                        # One login per person and side: the cookie then works on every
                        # process (one secret, sessions in the database), as behind a
                        # balancer; logging in again would meet the per-address login brake.
                        if side not in logged_in:
                            logged_in[side] = await log_in(server.bases, names)
                        tokens = logged_in[side]
                        await warm_up(server, tokens, expected)
                        db = db_pids if side == "vtai" else []
                        if procs == 1:
                            for n, think in levels:
                                key = label(n, think)
                                if key in data["skipped"]:
                                    continue
                                s = await measure(server, tokens[:n], seconds, think, db, expected)
                                data["levels"].setdefault(key, {})[side] = s
                                vtai_turns += s["turns"] if side == "vtai" else 0
                                print(f"  {NAMES[side]} {key}: {fmt(s)}", flush=True)
                                if s["client_cores"] > CLIENT_CPU_CAP:
                                    # Larger levels would measure the load generator.
                                    why = (
                                        f"the load generator used {s['client_cores']:.2f} of a "
                                        f"core at {key} on {NAMES[side]} (cap {CLIENT_CPU_CAP})"
                                    )
                                    for bigger in levels[levels.index((n, think)) + 1 :]:
                                        data["skipped"].setdefault(label(*bigger), why)
                        chats = tokens[:saturation_chats]
                        s = await measure(server, chats, saturation_seconds, 0, db, expected)
                        data["saturation"].setdefault(str(procs), {})[side] = s
                        vtai_turns += s["turns"] if side == "vtai" else 0
                        print(f"  {NAMES[side]} saturation x{procs}: {fmt(s)}", flush=True)
            if local is not None:
                n, think = local
                for side in SIDES:
                    async with app(side, tmp, mock_base, db_url, 1, LOCAL_MODEL) as server:
                        if side not in logged_in:
                            logged_in[side] = await log_in(server.bases, names)
                        tokens = logged_in[side]
                        await warm_up(server, tokens, None)
                        db = db_pids if side == "vtai" else []
                        s = await measure(server, tokens[:n], local_seconds, think, db, None)
                        data["local"][side] = s
                        vtai_turns += s["turns"] if side == "vtai" else 0
                        print(f"  {NAMES[side]} local model {label(n, think)}: {fmt(s)}")
            data["logs"] = {p.name: _tail(p, 3) for p in sorted(tmp.glob("*.log"))}
    data["connect_retries"] = dict(CONNECT_RETRIES)
    conn = await asyncpg.connect(db_url)
    try:
        data["vtai_turns"] = vtai_turns
        data["rows"] = await wait_rows(conn, rows_before + vtai_turns) - rows_before
        data["counters_exact"] = await common.counters_exact(conn)
        data["reserved"] = await conn.fetchval(
            "select coalesce(sum(reserved), 0) from usage_counters"
        )
    finally:
        await conn.close()
    return summarize(data)


async def wait_rows(conn: asyncpg.Connection, n: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while True:
        count = await conn.fetchval("select count(*) from request_logs")
        if count >= n or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.1)


def fmt(s: dict) -> str:
    return (
        f"{s['turns']} turns, {s['turns_per_s']:.1f}/s, first p50 {ms(s['first_p50'])} ms, "
        f"last p50 {ms(s['last_p50'])} ms, server {ms(s['server_cpu_per_turn'])} ms CPU/turn, "
        f"client {s['client_cores']:.2f} cores, {s['errors']} errors"
    )


def label(chats: int, think: float) -> str:
    return f"{chats}@{think:g}"


def cpu_cell(s: dict) -> str:
    cell = ms(s["server_cpu_per_turn"])
    if s["db_cpu_per_turn"] > 0:
        cell += f" + {ms(s['db_cpu_per_turn'])} db"
    return cell


def summarize(data: dict) -> common.Section:
    rows = []
    ideal_first = data["latency_ms"] / 1000
    ideal_last = ideal_first + (data["chunks"] - 1) * data["gap_ms"] / 1000

    def add(load: str, sides: dict, compare: bool) -> None:
        """A row per server; VT.ai's `added` columns against the bare app's, if `compare`."""
        b = sides.get("bare")
        for side in SIDES:
            s = sides.get(side)
            if s is None:
                continue
            added = (
                [ms(s[m] - b[m]) for m in ("first_p50", "first_p99", "last_p50", "last_p99")]
                if compare and side == "vtai" and b
                else ["—"] * 4
            )
            rows.append(
                [
                    load,
                    NAMES[side],
                    f"{s['turns']:,}",
                    f"{s['turns_per_s']:.1f}",
                    ms(s["first_p50"]),
                    ms(s["first_p99"]),
                    ms(s["last_p50"]),
                    ms(s["last_p99"]),
                    *added,
                    cpu_cell(s),
                    f"{s['client_cores']:.2f}",
                    str(s["errors"]),
                ]
            )

    for key, sides in data["levels"].items():
        chats, _, think = key.partition("@")
        add(f"{chats} chats, a message every ~{think} s", sides, True)
    if data["local"]:
        chats, think = data["local_spec"]
        add(f"{chats} chats on the local model, a message every ~{think:g} s", data["local"], True)
    for procs, sides in data["saturation"].items():
        load = (
            f"saturation, {data['saturation_chats']} chats back to back, "
            f"{procs} process{'es' if procs != '1' else ''}"
        )
        add(load, sides, False)
    errors = [
        f"{NAMES[side]} {where}: {s['errors']} ({s['first_error']})"
        for where, sides in [
            *data["levels"].items(),
            *data["saturation"].items(),
            *([("local model", data["local"])] if data["local"] else []),
        ]
        for side, s in sides.items()
        if s["errors"]
    ]
    spec = ",".join(label(n, t) for n, t in data["level_spec"])
    command = (
        f"python benchmarks/socket_load.py --levels {spec} --seconds {data['seconds']:g}"
        f" --saturation-chats {data['saturation_chats']}"
        f" --saturation-seconds {data['saturation_seconds']:g} --processes {data['processes']}"
        f" --chunks {data['chunks']} --gap-ms {data['gap_ms']:g}"
        f" --latency-ms {data['latency_ms']:g}"
        + (
            f" --local {label(*data['local_spec'])} --local-seconds {data['local_seconds']:g}"
            if data["local_spec"]
            else ""
        )
    )
    notes = [
        "Each chat: `POST /login` (a password login), a socket.io connection to "
        "`/ws/socket.io` with the cookie (python-socketio's client, tests/chainlit_client.py), "
        "`client_message` events as the browser sends them; times from emitting the message "
        "to the first and the last `stream_token` event received, in ms. Added = VT.ai's "
        "percentile minus the bare app's at the same level. A level K@S: K chats open at once, "
        "each sending its next message about S s (0.5-1.5x, at random) after its answer "
        f"ended, for {data['seconds']:g} s; the first message at a random moment in the first S s.",
        f"The mock provider waits {data['latency_ms']:g} ms, then streams {data['chunks']} "
        f"tokens {data['gap_ms']:g} ms apart: the fastest possible turn is "
        f"{ms(ideal_first)} ms to the first token and {ms(ideal_last)} ms to the last.",
        "VT.ai: `chainlit run vtai/main.py`, `VTAI_MODEL=openai/fake` on the mock, a user "
        "each on a tier no one reaches (the gate's full arithmetic), metering, ledger, "
        "history (threads and steps in Postgres) and every guard on, as shipped. Bare: "
        "`chainlit run benchmarks/bare_app/app.py`, the same `litellm.acompletion` streamed "
        "into `cl.Message.stream_token`, nothing else (no database).",
        "Server CPU/turn: the app processes' CPU time (user + system) over the level, per "
        "answered turn; `+ db` is PostgreSQL's (postmaster and backends). Client cores: the "
        f"load generator's own CPU over the level (one process; a level above {CLIENT_CPU_CAP} "
        "of a core is not run further: its own queueing would be measured).",
        f"Saturation: {data['saturation_chats']} chats back to back (no pause) for "
        f"{data['saturation_seconds']:g} s on 1 and on {data['processes']} app processes "
        "sharing the database. Several processes sit behind HAProxy with the config `make "
        "run WORKERS=N` writes (vtai.cluster.haproxy: round robin, an inserted sticky cookie, "
        "health checks; the bare app's on `/auth/config`, having no `/healthz`): each chat "
        "first gets the balancer's cookie, as a browser's first page load does, then logs in "
        "and talks through the balancer to the process the cookie names. Server CPU there "
        "includes HAProxy's. Everything (the app processes, HAProxy, PostgreSQL, the mock and "
        "the load generator) shares this machine's cores.",
        *(
            [
                f"Local model: `VTAI_MODEL={LOCAL_MODEL}` on VT.ai and the same model on the "
                "bare app (it registers the LiteLLM provider vtai.llm.local_model, the model "
                f"runtime only), answers capped at {LOCAL_MAX_TOKENS} tokens on both, "
                f"{data['local_seconds']:g} s per server. The model is sampled, so answers "
                "differ in length between turns and servers: the added times here mix VT.ai's "
                "cost with the model's; server CPU per turn is mostly the model's."
            ]
            if data["local"]
            else []
        ),
        f"VT.ai ledger rows: {data['rows']:,} of {data['vtai_turns']:,} answered turns; "
        f"counters equal the ledger: {data['counters_exact']}; tokens still reserved after "
        f"the chats closed: {data['reserved']}.",
    ]
    for key, why in data["skipped"].items():
        notes.append(f"Level {key} not run: {why}.")
    notes.append("Errors: " + ("; ".join(errors) if errors else "none") + ".")
    retries = data.get("connect_retries") or {}
    if retries:
        notes.append(
            "Chats whose socket.io connection was opened again (a process just started missed "
            "the client's 10 s wait): "
            + ", ".join(f"{NAMES[side]} {n}" for side, n in retries.items())
            + "."
        )
    columns = [
        "load", "server", "turns", "turns/s", "first token p50", "first token p99",
        "last token p50", "last token p99", "added first p50", "added first p99",
        "added last p50", "added last p99", "server CPU ms/turn", "client cores", "errors",
    ]  # fmt: skip
    return common.Section("Chats through the real server", command, columns, rows, notes, [], data)


def parse_levels(text: str) -> list[tuple[int, float]]:
    """'50@20,200@20' -> [(50, 20.0), (200, 20.0)]: chats @ seconds between messages."""
    levels = []
    for part in text.split(","):
        chats, _, think = part.strip().partition("@")
        try:
            level = (int(chats), float(think))
        except ValueError:
            level = (0, 0.0)
        if level[0] < 1 or level[1] <= 0:
            raise argparse.ArgumentTypeError(f"{part.strip()!r} is not CHATS@SECONDS, e.g. 50@20")
        levels.append(level)
    return levels


async def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--levels",
        type=parse_levels,
        default="50@20,200@20,500@20",
        help="chats@seconds between one chat's messages, comma-separated",
    )
    p.add_argument("--seconds", type=float, default=60, help="per level per server")
    p.add_argument("--saturation-chats", type=int, default=100)
    p.add_argument("--saturation-seconds", type=float, default=20)
    p.add_argument("--processes", type=int, default=3, help="app processes for saturation")
    p.add_argument("--chunks", type=int, default=40, help="tokens in the mock's answer")
    p.add_argument("--gap-ms", type=float, default=20.0, help="ms between the mock's tokens")
    p.add_argument("--latency-ms", type=float, default=300.0, help="ms to the first token")
    p.add_argument(
        "--local",
        default="4@5",
        help="chats@seconds on the local model, both servers ('none': not run)",
    )
    p.add_argument("--local-seconds", type=float, default=60, help="per server")
    args = p.parse_args()
    local = None if args.local == "none" else parse_levels(args.local)[0]
    async with common.database(args.db_url) as url:
        result = await bench(
            url, args.levels, args.seconds, args.saturation_chats, args.saturation_seconds,
            args.processes, args.chunks, args.gap_ms, args.latency_ms, local,
            args.local_seconds,
        )  # fmt: skip
    common.finish(result, args.json)


if __name__ == "__main__":
    if "--serve-mock" in sys.argv:
        m = argparse.ArgumentParser()
        m.add_argument("--serve-mock", action="store_true")
        m.add_argument("--port", type=int, default=0)
        m.add_argument("--chunks", type=int, default=40)
        m.add_argument("--gap-ms", type=float, default=20.0)
        m.add_argument("--latency-ms", type=float, default=300.0)
        a = m.parse_args()
        serve_mock(a.port, a.chunks, a.gap_ms, a.latency_ms)
    else:
        asyncio.run(main())
