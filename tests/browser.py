"""Drive the real app in Debian's headless Chromium: start a server, log in, chat."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import asynccontextmanager
from pathlib import Path

from playwright.async_api import Page, async_playwright

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = "/usr/lib/chromium/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PASSWORD = "correct horse battery"  # what tests.conftest.add_user sets
ASSISTANT = '[data-step-type="assistant_message"]'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@asynccontextmanager
async def running_app(db_url: str, data_dir: Path, **env_overrides: str):
    """A real `chainlit run vtai/main.py` on a free port, against the given database."""
    port = free_port()
    env = dict(os.environ)
    env.pop("CI", None)  # chainlit would plant a fake OPENAI_API_KEY in --ci mode
    env.update(
        VTAI_DATABASE_URL=db_url,
        VTAI_DATA_DIR=str(data_dir),
        CHAINLIT_AUTH_SECRET="test-secret-" + "x" * 40,
        **env_overrides,
    )
    log = (data_dir / "app.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chainlit",
            "run",
            str(ROOT / "vtai" / "main.py"),
            "--headless",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        await asyncio.to_thread(_wait_until_up, base, proc, data_dir / "app.log")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _wait_until_up(base: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(base + "/login", timeout=2) as r:
                if r.status == 200 and "Your app is available" in log.read_text():
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"app did not start: {log.read_text()[-2000:]}")


@asynccontextmanager
async def browser_page():
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 800})
            yield page
        finally:
            await browser.close()


async def login(page: Page, base: str, username: str, password: str = PASSWORD) -> None:
    await page.goto(base + "/login", wait_until="domcontentloaded")
    await page.fill("#email", username)
    await page.fill("#password", password)
    await page.click("button[type=submit]")
    await page.wait_for_selector("#chat-input", timeout=30_000)
    # The Usage button arrives when on_chat_start has run; before that, the composer can
    # still be re-rendered and drop what a test typed or attached.
    await page.get_by_role("button", name="Usage").first.wait_for(timeout=30_000)


async def send(page: Page, text: str, timeout: float = 90) -> str:
    """Send a message and return the text of the new assistant message once it is final."""
    before = await page.locator(ASSISTANT).count()
    await page.fill("#chat-input", text)
    await page.click("#chat-submit")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (
            await page.locator(ASSISTANT).count() > before
            and await page.locator("#chat-submit").is_visible()
        ):
            return await page.locator(ASSISTANT).last.inner_text()
        await asyncio.sleep(0.2)
    raise TimeoutError(f"no answer to {text!r} within {timeout}s")


async def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path
