"""The admin dashboard end to end in headless Chromium, on a month of generated traffic.

The app is the real `chainlit run vtai/main.py`, so the test exercises the real Chainlit
server (its login, cookie, catch-all route and /public).
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.admin.test_routes import seed_traffic
from tests.browser import browser_page, login, running_app, screenshot
from tests.conftest import add_user
from tests.fake_balance_api import FakeBalanceApi

pytestmark = pytest.mark.browser


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
    # More users than one page of the users table holds (no password: they never sign in).
    await conn.execute(
        "insert into profiles (username) select 'zz-member-' || lpad(g::text, 3, '0')"
        " from generate_series(0, 249) g"
    )

    async with (
        running_app(
            db_url,
            tmp_path,
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

        # The users table: the first 100 names, then 100 more on request, then the rest.
        names = sorted(await conn.fetch("select username from profiles"), key=lambda r: r[0])
        assert len(loaded["users"]["users"]) == 100
        assert len(await table_rows(page, "#users")) == 100
        await page.click("#users-more")
        await page.wait_for_function("() => window.vtaiAdmin.users.users.length === 200")
        await page.click("#users-more")
        await page.wait_for_function(f"() => window.vtaiAdmin.users.users.length === {len(names)}")
        assert await page.is_hidden("#users-more")
        shown = await page.evaluate("window.vtaiAdmin.users.users.map(u => u.username)")
        in_db = await conn.fetch("select username from profiles order by username")
        assert shown == [r["username"] for r in in_db]
        # The search asks the server for names starting with what is typed.
        await page.fill("#users-search", "ZZ-MEMBER-12")
        await page.wait_for_function("() => window.vtaiAdmin.users.users.length === 10")
        rows = await table_rows(page, "#users")
        assert [r[0] for r in rows] == [f"zz-member-12{i}" for i in range(10)]
        await page.fill("#users-search", "")
        await page.wait_for_function("() => window.vtaiAdmin.users.users.length === 100")
        # ...through the real server: the page's cookie, the route's keyset and prefix.
        api = page.context.request
        r = await api.get(base + "/admin/api/users?limit=100&after=zz-member-199&q=zz")
        assert r.ok and [u["username"] for u in (await r.json())["users"]] == [
            f"zz-member-{i}" for i in range(200, 250)
        ]
        r = await api.get(base + "/admin/api/users?limit=5&q=al")
        assert [u["username"] for u in (await r.json())["users"]] == ["alice"]

        # Filter the log: alice's successful requests, alice found by typing her name.
        await page.fill("#log-user-search", "ali")
        await page.wait_for_function("() => (window.vtaiAdmin.logUsers || []).join() === 'alice'")
        await page.select_option("#log-filter [name=user]", str(alice.id))
        await page.select_option("#log-filter [name=status]", "success")
        await page.click("#log-filter button[type=submit]")
        # Arrow functions: the CSP has no 'unsafe-eval' for Playwright's string predicates.
        await page.wait_for_function(
            "() => window.vtaiAdmin.logs.rows.every(r => r.username === 'alice' && "
            "r.status === 'success')"
        )
        first = await table_rows(page, "#logs")
        assert len(first) == 50 and all(r[1] == "alice" and r[3] == "success" for r in first)
        first_ids = await page.evaluate("window.vtaiAdmin.logs.rows.map(r => r.id)")

        # Page forward: the next 50, all older than the first page.
        await page.click("#logs-next")
        await page.wait_for_function("() => window.vtaiAdmin.logPage === 1")
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
