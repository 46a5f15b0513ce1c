"""`make run WORKERS=3` for real: three `chainlit run` processes behind a real HAProxy on one
Postgres, and one of them SIGKILLed while a browser chat on it is mid-answer.

The chats reach a live process through the balancer (the browser by resuming the chat from
the sidebar, a socket.io client by reconnecting to its thread) and go on, signed in, with their
history. The killed turn is settled by journal recovery (a live sibling's, or the restarted
process's) seconds after the kill, not at its 900 s TTL: charged its prompt and the tokens that
had streamed, as a stopped turn is. Each answered turn is in the ledger once, no cap is
overshot, and the counters equal the ledger. The supervisor restarts the killed process.

The model is the FAKE provider in tests/fake_provider.py (a stand-in for a remote API), through
LiteLLM's real HTTP client; `#mode:slow` makes it answer a token every 100 ms.
One browser chat plus one socket.io chat (tests/chainlit_client.py) keeps it within budget.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from playwright.async_api import TimeoutError as PlaywrightTimeout

from tests.browser import ASSISTANT, browser_page, login, screenshot, send
from tests.chainlit_client import ChatClient
from tests.chainlit_client import login as socket_login
from tests.conftest import ROOT, add_user
from tests.fake_provider import FakeProvider
from tests.metered_app import MeteredApp
from vtai.cluster.haproxy import COOKIE
from vtai.cluster.supervisor import STATE

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# The composer's send button can be clicked: its socket is connected and it holds text.
USABLE = "() => { const b = document.querySelector('#chat-submit'); return !!b && !b.disabled; }"

WORKERS = 3
PASSWORD = "correct horse battery"
LIMIT = 10_000  # the free tier's


def free_ports(count: int) -> int:
    """A port p with p .. p+count-1 free: the balancer's and the processes' (CHAINLIT_PORT+n)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count > 65535:
            continue
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no run of free ports")


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (OSError, http.client.HTTPException):
        return False


async def until(check, what: str, timeout: float = 60.0, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        await asyncio.sleep(every)


def state(data: Path) -> dict:
    return json.loads((data / STATE).read_text())


@pytest.fixture
async def cluster(db_url, tmp_path):
    provider = FakeProvider().start()
    port = free_ports(WORKERS + 1)
    data = tmp_path / "data"
    env = dict(os.environ)
    env.pop("CI", None)
    env.update(
        VTAI_DATABASE_URL=db_url,
        VTAI_DATA_DIR=str(data),
        CHAINLIT_HOST="127.0.0.1",
        CHAINLIT_PORT=str(port),
        CHAINLIT_AUTH_SECRET="test-secret-" + "x" * 40,
        VTAI_MODEL="openai/fake",
        OPENAI_API_BASE=provider.url("script"),
        OPENAI_BASE_URL=provider.url("script"),
        OPENAI_API_KEY="sk-test-not-a-real-key",
        VTAI_MAX_TOKENS="40",
        VTAI_REQUEST_TIMEOUT="20",
        PYTHONUNBUFFERED="1",
        LITELLM_LOCAL_MODEL_COST_MAP="True",
    )
    data.mkdir()
    log_path = data / "launch.log"
    log = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vtai.launch", "--workers", str(WORKERS)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        async def all_up():
            if proc.poll() is not None:
                raise RuntimeError(f"launcher exited: {log_path.read_text()[-3000:]}")
            urls = [f"http://127.0.0.1:{port + n}/healthz" for n in range(1, WORKERS + 1)]
            return all(await asyncio.gather(*(asyncio.to_thread(_up, u) for u in urls)))

        await until(all_up, "three app processes answering /healthz", timeout=120)
        await until(lambda: asyncio.to_thread(_up, base + "/login"), "the balancer", 10)
        yield base, port, data, log_path
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        provider.stop()


async def test_a_process_killed_mid_answer_loses_no_chat_and_no_token(cluster, db_url, conn):
    base, port, data, log_path = cluster
    app = MeteredApp(base, db_url)
    user = await add_user(conn)
    config = (data / "haproxy.cfg").read_text()
    assert f"cookie {COOKIE} insert" in config and "option httpchk GET /healthz" in config
    # /metrics is not routed through the balancer; each process serves its own.
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(base + "/metrics", timeout=5)
    assert _up(f"http://127.0.0.1:{port + 1}/metrics")

    async with browser_page() as page:
        await login(page, base, user.username)
        cookies = {c["name"]: c["value"] for c in await page.context.cookies()}
        node = cookies[COOKIE]  # the process the balancer pinned this browser to
        first = await send(page, "hello from the browser")
        assert "tokens used" in first

        # A second chat of the same user, over socket.io, pinned to the same process.
        token = await socket_login(base, user.username, PASSWORD)
        client = ChatClient(base, f"{token}; {COOKIE}={node}")
        await client.connect()
        reply = await client.send("hello from socket.io")
        assert reply.answer is not None and client.thread_id
        socket_thread = client.thread_id

        # A slow answer starts streaming in the browser; its process is SIGKILLed mid-answer.
        before = await page.locator(ASSISTANT).count()
        await page.fill("#chat-input", "#mode:slow tell me everything")
        await page.click("#chat-submit")

        async def streaming():
            if await page.locator(ASSISTANT).count() <= before:
                return False
            return len(await page.locator(ASSISTANT).last.inner_text()) > 10

        await until(streaming, "the slow answer streaming", timeout=30, every=0.05)
        assert await app.sql("select 1 from reservations where end_user = $1", user.id), (
            "the turn in flight holds a reservation"
        )
        victim = state(data)[node]["pid"]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()

        # Journal recovery settles the in-flight turn's reservation with its row (and gives
        # back any taken ahead for the chats' next turns): in seconds, where the TTL is 900 s.
        await app.no_reservations(user, timeout=30)
        released_after = time.monotonic() - killed_at
        await client.close()

        # The socket.io chat: reconnects to its thread on a live process and goes on.
        resumed = ChatClient(base, token)
        await resumed.connect(socket_thread)
        again = await resumed.send("and you?")
        await resumed.close()
        assert again.answer is not None

        # The browser chat: back through the balancer, still signed in, history there.
        (thread_id,) = [
            r["id"]
            for r in await app.sql('select id from "Thread" where "userId" is not null')
            if r["id"] != socket_thread
        ]
        await page.goto(base + "/", wait_until="domcontentloaded")
        await page.wait_for_selector(f"#thread-{thread_id}", timeout=30_000)
        await page.click(f"#thread-{thread_id} a")
        await page.wait_for_url(f"**/thread/{thread_id}", timeout=30_000)
        await page.get_by_text("hello from the browser").first.wait_for(timeout=30_000)
        # The composer takes messages once the chat has resumed on the live process: its
        # socket may first land on a process the balancer then moves it off (the cookie still
        # named the dead one), so wait for the send button to be usable, reloading once.
        await page.get_by_role("button", name="Usage").first.wait_for(timeout=30_000)
        assert "/login" not in page.url
        question = "are you still there?"
        for attempt in range(2):
            # (The button is disabled while the composer is empty, so there is text in it.)
            await page.fill("#chat-input", question)
            try:
                await page.wait_for_function(USABLE, timeout=30_000)
                break
            except PlaywrightTimeout:
                if attempt:
                    raise
                await page.reload(wait_until="domcontentloaded")
                await page.get_by_text("hello from the browser").first.wait_for(timeout=30_000)
        after = await send(page, question)
        await screenshot(page, "cluster_after_kill")
        assert "tokens used" in after
        now_on = {c["name"]: c["value"] for c in await page.context.cookies()}[COOKIE]
        assert now_on != node

    # The supervisor restarted the killed process on its port.
    async def restarted():
        s = state(data)[node]
        return (
            s["restarts"] == 1
            and s["pid"] != victim
            and await asyncio.to_thread(_up, f"http://127.0.0.1:{s['port']}/healthz")
        )

    await until(restarted, "the killed process restarted", timeout=90)
    # The operator's view of it: every process healthy, the killed one restarted once.
    shown = subprocess.run(
        [sys.executable, "-m", "vtai.cli", "cluster", "status"],
        cwd=ROOT,
        env={**os.environ, "VTAI_DATA_DIR": str(data), "VTAI_DATABASE_URL": db_url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stdout + shown.stderr
    lines = shown.stdout.splitlines()
    assert len(lines) == WORKERS + 1, lines
    assert all("healthy (HTTP 200)" in line for line in lines if line.startswith("p")), lines
    assert any(line.startswith(node + " ") and "restarts 1" in line for line in lines), lines

    rows = await app.rows(user, 5)
    answered = [r for r in rows if r["status"] == "success"]
    # The four answers the user saw, once each; the killed turn once, settled by recovery
    # with what it had cost when its process died: the prompt and the tokens streamed.
    assert len(answered) == 4 and len(rows) == 5, [(r["status"], r["response"]) for r in rows]
    assert len({r["litellm_call_id"] for r in rows}) == 5
    (cut,) = [r for r in rows if r["status"] == "failure"]
    details = cut["additional_details"]
    details = json.loads(details) if isinstance(details, str) else details
    assert details["process_died"] and details["aborted"] and details["estimated"]
    assert cut["prompt_tokens"] > 0 and cut["completion_tokens"] == details["streamed_tokens"]
    # Progress is journaled every 8 tokens; the browser saw more than 10 characters stream.
    assert cut["completion_tokens"] % 8 == 0
    assert await app.sql("select * from vtai_verify_counters()") == []
    # (The open chats may hold their next turn's reservation ahead: `used` is what counts.)
    used = await app.used(user)
    assert used == sum(r["total_tokens"] for r in rows) <= LIMIT
    log = log_path.read_text()
    assert f"{node} (pid {victim}) ended with signal SIGKILL" in log
    assert "in-flight row(s) of a dead process" in log
    print(f"reservations released {released_after:.1f} s after the kill")
