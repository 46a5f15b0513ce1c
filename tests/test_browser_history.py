"""Chat history end to end in headless Chromium: chats persist, list, resume, and delete."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests.browser import ASSISTANT, browser_page, login, running_app, screenshot, send
from tests.conftest import add_user

pytestmark = pytest.mark.browser

USER_MESSAGE = '[data-step-type="user_message"]'
FIRST = "My name is Zorro and my dog is called Biscuit."
SECOND = "Write one sentence about the moon."
FOLLOW_UP = "What is my dog called?"


async def threads(conn, user) -> list:
    return await conn.fetch(
        'select id, name from "Thread" where "userId" = $1 order by "createdAt"', str(user.id)
    )


async def wait_for(predicate, timeout: float = 30, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{what} not met within {timeout}s")


async def ledger(conn, session_id: str) -> list:
    return await conn.fetch(
        "select status, total_tokens, messages from request_logs"
        " where session_id = $1 order by created_at",
        session_id,
    )


async def test_chats_persist_list_resume_with_context_and_delete_without_refund(
    db_url, conn, tmp_path
):
    user = await add_user(conn, "zorro")
    async with (
        running_app(db_url, tmp_path, VTAI_MAX_TOKENS="40") as base,
        browser_page() as page,
    ):
        await login(page, base, "zorro")
        first_reply = await send(page, FIRST)
        assert "tokens used" in first_reply

        # Thumbs up on the answer is stored against its step.
        await page.locator(ASSISTANT).last.hover()
        await page.locator(".positive-feedback-off").last.click()
        await page.locator("[role=dialog] textarea").fill("spot on")
        await page.click("#submit-feedback")
        feedback = await wait_for(
            lambda: conn.fetch('select "stepId", value, comment from "Feedback"'),
            what="feedback row",
        )
        assert [(r["value"], r["comment"]) for r in feedback] == [(1.0, "spot on")]

        await page.click("#new-chat-button")
        await page.click("#new-chat-dialog #confirm")
        await page.wait_for_function(
            f"() => document.querySelectorAll('{ASSISTANT}').length === 0", timeout=15_000
        )
        second_reply = await send(page, SECOND)
        assert "tokens used" in second_reply
        chats = await wait_for(
            lambda: _two(threads(conn, user)), what="two threads in the database"
        )
        first_id, second_id = chats[0]["id"], chats[1]["id"]
        assert chats[0]["name"] == FIRST and chats[1]["name"] == SECOND
        # The chat's id is the ledger's session id: one identifier for history and billing.
        assert len(await ledger(conn, first_id)) == 1
        assert len(await ledger(conn, second_id)) == 1
        assert feedback[0]["stepId"] in {
            r["id"]
            for r in await conn.fetch('select id from "Step" where "threadId" = $1', first_id)
        }

        await page.reload(wait_until="domcontentloaded")
        await page.wait_for_selector(f"#thread-{first_id}", timeout=30_000)
        await page.wait_for_selector(f"#thread-{second_id}", timeout=30_000)
        sidebar = await page.locator("#thread-history").inner_text()
        assert FIRST[:20] in sidebar and SECOND[:20] in sidebar
        await page.wait_for_selector("#chat-input", timeout=30_000)
        await screenshot(page, "history_sidebar")

        # Open the first chat: its messages come back, and the model gets them as context.
        await page.click(f"#thread-{first_id} a")
        await page.wait_for_url(f"**/thread/{first_id}", timeout=30_000)
        earlier = page.locator(USER_MESSAGE, has_text=FIRST)
        await earlier.wait_for(timeout=30_000)
        await page.wait_for_selector("#chat-input", timeout=30_000)
        await screenshot(page, "history_opened")
        follow_up = await send(page, FOLLOW_UP)
        await screenshot(page, "history_resumed")
        # The earlier messages stay, above the new ones (Chainlit scrolls the new one to the top).
        await earlier.scroll_into_view_if_needed()
        assert await earlier.is_visible()
        await screenshot(page, "history_resumed_earlier")
        answer = follow_up.split("\n---\n")[0].split("tokens used")[0]
        assert len(answer.strip()) > 0 and "tokens used" in follow_up

        rows = await wait_for(
            lambda: _at_least(ledger(conn, first_id), 2), what="follow-up ledger row"
        )
        sent = json.loads(rows[-1]["messages"])
        assert [m["role"] for m in sent][:3] == ["user", "assistant", "user"]
        assert sent[0]["content"] == FIRST and sent[-1]["content"] == FOLLOW_UP
        assert "tokens used" not in sent[1]["content"]  # the quota footer is not context
        stored = await conn.fetchval(
            'select output from "Step" where "threadId" = $1 and type = \'assistant_message\''
            ' order by "startTime" limit 1',
            first_id,
        )
        assert sent[1]["content"] and stored.startswith(sent[1]["content"])

        # Delete the first chat from the sidebar.
        used_before = await conn.fetchval("select sum(used) from usage_counters")
        logs_before = await conn.fetch("select * from request_logs order by id")
        await page.goto(base + "/", wait_until="domcontentloaded")
        item = page.locator(f"#thread-{first_id}")
        await item.wait_for(timeout=30_000)
        await item.hover()
        await item.locator("#thread-options").click()
        await page.click("#delete-thread")
        await screenshot(page, "history_delete_confirm")
        await page.get_by_role("button", name="Confirm").click()
        await page.wait_for_selector(f"#thread-{first_id}", state="detached", timeout=30_000)
        assert await page.locator(f"#thread-{second_id}").count() == 1
        await screenshot(page, "history_deleted")

        usage = await send(page, "/usage")
        await screenshot(page, "history_usage_after_delete")

    # /usage was sent in a fresh chat, which is a thread of its own.
    remaining = [r["id"] for r in await threads(conn, user)]
    assert first_id not in remaining and second_id in remaining
    assert await conn.fetchval('select count(*) from "Step" where "threadId" = $1', first_id) == 0
    assert await conn.fetchval('select count(*) from "Feedback"') == 0
    # Billing is untouched: the deleted chat's ledger rows and the counters stay as they were.
    assert await conn.fetch("select * from request_logs order by id") == logs_before
    assert len(await ledger(conn, first_id)) == 2
    assert await conn.fetchval("select sum(used) from usage_counters") == used_before
    assert f"{used_before:,} / 10,000 tokens used" in usage
    assert await conn.fetch("select * from vtai_verify_counters()") == []


async def _two(rows):
    rows = await rows
    return rows if len(rows) >= 2 else None


async def _at_least(rows, n):
    rows = await rows
    return rows if len(rows) >= n else None
