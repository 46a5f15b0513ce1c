"""Memory: the app's resident set at idle and with 200 chats answering at once.

What is measured (VmRSS from /proc, MiB), each in a fresh process:

* the real app, `chainlit run vtai/main.py`, idle after start-up (it loads the local model at
  start-up), with no chat open;
* a `Services` process (what the app builds at start-up, without Chainlit's web server):
  after start, after loading the local model, then with N chats each sending a message at
  the same moment (each with a few turns of history), sampled every 20 ms until all answers
  are in, and once more afterwards. Two generate at once on the local model; the rest queue,
  holding their history, reservation and stream.

    python benchmarks/memory.py [--db-url URL] [--sessions 200] [--no-chainlit]
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg  # noqa: E402

from benchmarks import common  # noqa: E402

SCRIPT = str(Path(__file__).resolve())
HISTORY = [
    {"role": "user", "content": "Hi! Can you help me plan a short trip?"},
    {"role": "assistant", "content": "Of course. Where would you like to go, and for how long?"},
    {"role": "user", "content": "Three days in Lisbon, in spring."},
    {"role": "assistant", "content": "Lovely choice. Day one: Alfama and the castle; day two..."},
]


async def worker(db_url: str, sessions: int, max_tokens: int) -> dict:
    from vtai.llm import local_model
    from vtai.llm.models import LOCAL_MODEL_ID
    from vtai.metering.turn import TurnRequest
    from vtai.services import Services
    from vtai.settings import Settings

    rss = {"python + imports": common.rss_mib()}
    with common.data_dir() as tmp:
        settings = Settings(
            database_url=db_url, data_dir=tmp, model=LOCAL_MODEL_ID, max_tokens=max_tokens
        )
        services = await Services.start(settings, replay=False)
        try:
            rss["services started"] = common.rss_mib()
            await asyncio.to_thread(local_model.server)
            conn = await asyncpg.connect(db_url)
            try:
                users = await common.add_users(conn, sessions)
            finally:
                await conn.close()

            async def ignore(_token: str) -> None:
                return None

            warm = await services.runner.run(
                TurnRequest(users[0], "warm", LOCAL_MODEL_ID, [], "Say hi."), ignore
            )
            rss["idle, model loaded"] = common.rss_mib()
            peak = rss["idle, model loaded"]
            done = asyncio.Event()

            async def sample() -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, common.rss_mib())
                    await asyncio.sleep(0.02)

            sampler = asyncio.create_task(sample())
            t0 = time.monotonic()
            outcomes = await asyncio.gather(
                *(
                    services.runner.run(
                        TurnRequest(u, f"chat-{i}", LOCAL_MODEL_ID, HISTORY, "What should I eat?"),
                        ignore,
                    )
                    for i, u in enumerate(users)
                )
            )
            elapsed = time.monotonic() - t0
            done.set()
            await sampler
            rss[f"peak, {sessions} chats answering"] = peak
            rss[f"after, {sessions} chats answered"] = common.rss_mib()
            await services.runner.drain()
            kinds = [o.kind for o in outcomes] + [warm.kind]
        finally:
            await services.stop()
    return {
        "rss": rss,
        "answered": kinds.count("answered"),
        "kinds": {k: kinds.count(k) for k in set(kinds)},
        "seconds": elapsed,
    }


def chainlit_idle(db_url: str, timeout: float = 120) -> float:
    """RSS of a real `chainlit run vtai/main.py` once it serves the login page."""
    from tests.browser import free_port

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ)
        env.pop("CI", None)
        env.update(
            VTAI_DATABASE_URL=db_url,
            VTAI_DATA_DIR=tmp,
            CHAINLIT_AUTH_SECRET="bench-secret-" + "x" * 40,
        )
        log_path = Path(tmp) / "app.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "chainlit",
                    "run",
                    str(common.ROOT / "vtai" / "main.py"),
                    "--headless",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ],  # fmt: skip
                cwd=common.ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    if proc.poll() is not None:
                        raise RuntimeError(f"app exited: {log_path.read_text()[-2000:]}")
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=2):
                            if "Your app is available" in log_path.read_text():
                                break
                    except OSError:
                        pass
                    time.sleep(0.3)
                else:
                    raise RuntimeError("app did not start")
                time.sleep(2)  # let start-up garbage settle
                return common.rss_mib(proc.pid)
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()


async def bench(db_url: str, sessions: int, max_tokens: int, chainlit: bool) -> common.Section:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        SCRIPT,
        "--worker",
        "--db-url",
        db_url,
        "--sessions",
        str(sessions),
        "--max-tokens",
        str(max_tokens),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, f"worker exited {proc.returncode}"
    data = json.loads(out.decode().strip().splitlines()[-1])
    if chainlit:
        data["chainlit_idle"] = await asyncio.to_thread(chainlit_idle, db_url)
    return section(data, sessions, max_tokens)


def section(data: dict, sessions: int, max_tokens: int) -> common.Section:
    rows = []
    if "chainlit_idle" in data:
        rows.append(
            ["`chainlit run vtai/main.py`, idle, model loaded", f"{data['chainlit_idle']:.0f}"]
        )
    rows += [[f"Services process: {k}", f"{v:.0f}"] for k, v in data["rss"].items()]
    idle = data["rss"]["idle, model loaded"]
    peak = data["rss"][f"peak, {sessions} chats answering"]
    notes = [
        f"{data['answered']} of {sessions + 1} turns answered by the local model "
        f"(SmolLM2-135M, max {max_tokens} tokens each) in {data['seconds']:.1f} s.",
        f"Per chat in flight: {(peak - idle) / sessions * 1024:.0f} KiB ((peak - idle) / chats).",
        "Not measured: Chainlit's own per-session state with 200 browser connections "
        "(socket.io sessions, message history in the UI layer).",
    ]
    return common.Section(
        "Memory",
        f"python benchmarks/memory.py --sessions {sessions} --max-tokens {max_tokens}",
        ["process and moment", "RSS MiB"],
        rows,
        notes,
        [],
        data,
    )


async def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--no-chainlit", action="store_true")
    p.add_argument("--worker", action="store_true", help=__import__("argparse").SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(await worker(args.db_url, args.sessions, args.max_tokens)), flush=True)
        return
    async with common.database(args.db_url) as url:
        result = await bench(url, args.sessions, args.max_tokens, not args.no_chainlit)
    common.finish(result, args.json)


if __name__ == "__main__":
    asyncio.run(main())
