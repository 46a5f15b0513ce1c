"""End to end in headless Chromium: log in, chat with the local model, hit the limit."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time

import pytest

from tests.browser import ASSISTANT, browser_page, login, running_app, screenshot, send
from tests.conftest import add_user

pytestmark = pytest.mark.browser


async def test_login_and_streamed_reply_from_local_model(db_url, conn, tmp_path):
    user = await add_user(conn, "walter")
    async with running_app(db_url, tmp_path, VTAI_MAX_TOKENS="48") as base, browser_page() as page:
        await login(page, base, "walter")
        await page.fill("#chat-input", "Write two sentences about the sea.")
        await page.click("#chat-submit")
        # Streamed: the answer is seen growing before it is complete.
        lengths = set()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if await page.locator(ASSISTANT).count():
                text = await page.locator(ASSISTANT).last.inner_text()
                lengths.add(len(text))
                if "tokens used" in text:
                    break
            await asyncio.sleep(0.05)
        final = await page.locator(ASSISTANT).last.inner_text()
        await screenshot(page, "chat_local_model")
        await asyncio.sleep(1.0)  # the ledger row lands just after the answer
        usage = await send(page, "/usage")
        await screenshot(page, "usage_after_turn")
    # Some tokens counted: not "0 / 10,000" (though "70 / 10,000" is fine).
    assert "10,000 tokens used" in usage, usage
    assert not re.search(r"(?<![\d,])0 / 10,000", usage), usage
    assert "free tier" in usage and "█" in usage
    assert "tokens used" in final and "free tier" in final, final
    assert len([n for n in lengths if n > 0]) >= 3, lengths
    row = await conn.fetchrow(
        "select status, prompt_tokens, completion_tokens, model, session_id"
        " from request_logs where end_user = $1",
        user.id,
    )
    assert row["status"] == "success" and row["model"] == "local/smollm2-135m"
    assert row["prompt_tokens"] > 0 and 0 < row["completion_tokens"] <= 48
    assert row["session_id"]


async def test_free_user_chats_until_refused(db_url, conn, tmp_path):
    user = await add_user(conn, "frugal")
    limit = 400
    async with (
        running_app(db_url, tmp_path, VTAI_LIMIT_FREE=str(limit), VTAI_MAX_TOKENS="64") as base,
        browser_page() as page,
    ):
        await login(page, base, "frugal")
        replies = []
        for i in range(20):
            replies.append(await send(page, f"Tell me a fact about the number {i}."))
            if (
                "You have used your token quota" in replies[-1]
                or "larger than what is left" in replies[-1]
                or "enough for a short answer" in replies[-1]
            ):
                break
        await screenshot(page, "chat_refused")
    refusal = replies[-1]
    assert "token quota" in refusal or "larger than what is left" in refusal, replies
    assert f"of {limit:,} tokens" in refusal and "resets" in refusal
    total = await conn.fetchval(
        "select coalesce(sum(total_tokens), 0) from request_logs where end_user = $1", user.id
    )
    assert 0 < total <= limit
    assert (
        await conn.fetchval(
            "select count(*) from request_logs where end_user = $1 and status = 'refused'", user.id
        )
        >= 1
    )


async def test_wrong_password_is_refused_and_empty_message_explained(db_url, conn, tmp_path):
    await add_user(conn, "carol")
    async with running_app(db_url, tmp_path) as base, browser_page() as page:
        await page.goto(base + "/login", wait_until="domcontentloaded")
        await page.fill("#email", "carol")
        await page.fill("#password", "not her password")
        await page.click("button[type=submit]")
        await asyncio.sleep(1.5)
        assert await page.locator("#chat-input").count() == 0
        await login(page, base, "carol")
        reply = await send(page, "/usage")
        assert "0 / 10,000 tokens used" in reply
        # The way to the same quota from code, one click away.
        await page.get_by_role("link", name="/account").click()
        await page.wait_for_selector("text=API keys", timeout=30_000)
    assert await conn.fetchval("select count(*) from request_logs") == 0


async def test_free_user_at_the_limit_continues_on_the_free_local_model(db_url, conn, tmp_path):
    """The paid model is tests/fake_provider.py, a FAKE OpenAI-compatible server (a real
    provider can't be reached from here); the free model is the real local one, made free
    with the operator's one command, `vtai model weight 'local/*' 0`."""
    from tests.fake_provider import FakeProvider

    provider = FakeProvider().start()
    try:
        weight = subprocess.run(
            [sys.executable, "-m", "vtai.cli", "model", "weight", "local/*", "0"],
            env={**os.environ, "VTAI_DATABASE_URL": db_url},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert weight.returncode == 0, weight.stderr
        user = await add_user(conn, "atlimit")
        await conn.execute(
            "select vtai_record(jsonb_build_object('litellm_call_id', 'earlier', 'end_user',"
            " $1::text, 'status', 'success', 'model', 'openai/fake', 'prompt_tokens', 300))",
            str(user.id),
        )
        env = {
            "VTAI_MODEL": "openai/fake",
            "OPENAI_API_BASE": provider.url("script"),
            "OPENAI_API_KEY": "sk-test-not-a-real-key",
            "VTAI_LIMIT_FREE": "300",
            "VTAI_MAX_TOKENS": "48",
        }
        async with running_app(db_url, tmp_path, **env) as base, browser_page() as page:
            await login(page, base, "atlimit")
            refusal = await send(page, "What is a tide?")
            button = page.get_by_role("button", name="Continue on the free SmolLM2 135M (local)")
            await button.wait_for(timeout=30_000)
            await screenshot(page, "plan_limit_choice")
            before = await page.locator(ASSISTANT).count()
            await button.click()
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                if await page.locator(ASSISTANT).count() > before:
                    answer = await page.locator(ASSISTANT).last.inner_text()
                    if "tokens used" in answer:
                        break
                await asyncio.sleep(0.2)
            await screenshot(page, "plan_free_model_answer")
    finally:
        provider.stop()
    assert "You have used your token quota" in refusal and "resets" in refusal, refusal
    assert "tokens used" in answer and "free" in answer, answer
    assert provider.calls == []
    row = await conn.fetchrow(
        "select model, status, weight, counted_tokens, total_tokens from request_logs"
        " where end_user = $1 and status = 'success' and litellm_call_id <> 'earlier'",
        user.id,
    )
    assert row["model"] == "local/smollm2-135m" and row["total_tokens"] > 0
    assert row["weight"] == 0 and row["counted_tokens"] == 0
    assert await conn.fetchval("select * from vtai_verify_counters()") is None
