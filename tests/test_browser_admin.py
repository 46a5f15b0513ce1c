"""The admin dashboard end to end in headless Chromium, on a month of generated traffic.

The app is `chainlit run` on a copy of vtai/main.py with `admin.register(...)` appended, so
the test exercises the real Chainlit server (its login, cookie, catch-all route and /public).
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import subprocess
import sys
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.browser import ROOT, _wait_until_up, browser_page, free_port, login, screenshot
from tests.conftest import add_user
from tests.fake_balance_api import FakeBalanceApi
from tests.test_admin import seed_traffic

pytestmark = pytest.mark.browser

REGISTER = """

# Added by tests/test_browser_admin.py: what the wiring in vtai/main.py does.
import chainlit.server  # noqa: E402

from vtai import admin  # noqa: E402

admin.register(chainlit.server.app)
"""


def main_with_admin(tmp_path: Path) -> Path:
    main = tmp_path / "main_with_admin.py"
    main.write_text((ROOT / "vtai" / "main.py").read_text() + REGISTER)
    return main


@asynccontextmanager
async def running_admin_app(db_url: str, data_dir: Path, main: Path, **env_overrides: str):
    """tests.browser.running_app, but on the given entry file."""
    port = free_port()
    env = dict(os.environ)
    env.pop("CI", None)
    env.update(
        VTAI_DATABASE_URL=db_url,
        VTAI_DATA_DIR=str(data_dir),
        CHAINLIT_AUTH_SECRET="test-secret-" + "x" * 40,
        **env_overrides,
    )
    log = (data_dir / "app.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "chainlit", "run", str(main), "--headless"]
        + ["--host", "127.0.0.1", "--port", str(port)],
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


@pytest.fixture(scope="module")
def balance_api():
    a = FakeBalanceApi().start()
    yield a
    a.stop()


async def table_rows(page, selector: str) -> list[list[str]]:
    return await page.eval_on_selector_all(
        f"{selector} tbody tr",
        "rows => rows.map(r => Array.from(r.cells, c => c.innerText.trim()))",
    )


async def test_admin_dashboard_end_to_end(db_url, conn, tmp_path, balance_api):
    await add_user(conn, "root", admin=True)
    people = [
        await add_user(conn, "alice", tier="premium"),
        await add_user(conn, "bob", tier="basic"),
        await add_user(conn, "carl"),
        await add_user(conn, "dana", tier="unlimited"),
    ]
    await seed_traffic(conn, [p.id for p in people], 3000, datetime.now(UTC), days=30)
    alice = people[0]

    async with (
        running_admin_app(
            db_url,
            tmp_path,
            main_with_admin(tmp_path),
            OPENROUTER_API_KEY="sk-or-v1-browser-test",
            VTAI_OPENROUTER_BASE=balance_api.url("ok"),
        ) as base,
        browser_page() as page,
    ):
        # Anonymous: sent to the login page.
        await page.goto(base + "/admin", wait_until="domcontentloaded")
        await page.wait_for_url("**/login", timeout=15_000)

        await login(page, base, "root")
        await page.goto(base + "/admin", wait_until="domcontentloaded")
        await page.wait_for_selector("body[data-loaded=true]", timeout=30_000)
        loaded = await page.evaluate("window.vtaiAdmin")
        for canvas in ("chart-requests", "chart-cost-model", "chart-tokens"):
            box = await page.locator(f"#{canvas}").bounding_box()
            assert box and box["width"] > 100 and box["height"] > 100, canvas
        assert await page.evaluate("Object.keys(Chart.instances).length") == 3
        assert sum(p["requests"] for p in loaded["series"]["points"]) > 2000
        assert sum(p["prompt_tokens"] for p in loaded["series"]["points"]) > 0
        assert len(loaded["series"]["by_model"]) == 3
        assert loaded["summary"]["this_period"]["requests"] > 0
        assert {u["username"] for u in loaded["users"]["users"]} >= {"alice", "bob", "root"}
        assert len(loaded["logs"]["rows"]) == 50
        await screenshot(page, "admin_dashboard")

        # Filter the log: alice's successful requests.
        await page.select_option("#log-filter [name=user]", str(alice.id))
        await page.select_option("#log-filter [name=status]", "success")
        await page.click("#log-filter button[type=submit]")
        await page.wait_for_function(
            "window.vtaiAdmin.logs.rows.every(r => r.username === 'alice' && "
            "r.status === 'success')"
        )
        first = await table_rows(page, "#logs")
        assert len(first) == 50 and all(r[1] == "alice" and r[3] == "success" for r in first)
        first_ids = await page.evaluate("window.vtaiAdmin.logs.rows.map(r => r.id)")

        # Page forward: the next 50, all older than the first page.
        await page.click("#logs-next")
        await page.wait_for_function("window.vtaiAdmin.logPage === 1")
        second = await page.evaluate("window.vtaiAdmin.logs.rows.map(r => r.id)")
        newest = await conn.fetch(
            "select id from request_logs where end_user = $1 and status = 'success'"
            " order by created_at desc, id desc limit 100",
            alice.id,
        )
        assert first_ids + second == [r["id"] for r in newest]
        assert await page.inner_text("#logs-page") == "page 2"
        await screenshot(page, "admin_logs_filtered_page2")

        # The CSV holds exactly the filtered rows.
        async with page.expect_download() as download_info:
            await page.click("#csv")
        download = await download_info.value
        text = Path(await download.path()).read_text()
        rows = list(csv.DictReader(io.StringIO(text)))
        expected = await conn.fetchval(
            "select count(*) from request_logs where end_user = $1 and status = 'success'",
            alice.id,
        )
        assert len(rows) == expected > 100
        assert {(r["username"], r["status"]) for r in rows} == {("alice", "success")}

        # Change bob's tier.
        bob_row = page.locator("#users tr[data-user=bob]")
        await bob_row.locator("select.tier").select_option("premium")
        await bob_row.locator("button.save-tier").click()
        await page.wait_for_selector("#message:has-text('bob is now on the premium tier')")
        assert await conn.fetchval("select tier from profiles where username = 'bob'") == "premium"

        # Sync balances from the (fake) OpenRouter credits endpoint.
        await page.click("#sync-balances")
        await page.wait_for_selector("#balances li:has-text('openrouter: 20.25 USD')")
        await screenshot(page, "admin_tier_changed_balances_synced")

        # A signed-in non-admin gets 403.
        await page.context.clear_cookies()
        await login(page, base, "carl")
        response = await page.goto(base + "/admin", wait_until="domcontentloaded")
        assert response.status == 403
