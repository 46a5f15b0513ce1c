"""Faults a user can cause or meet in the browser: a tampered session cookie, an attachment the
model can't read, and a provider failure followed by the Retry button.

The app is the real `chainlit run vtai/main.py`; the model behind it is the FAKE provider from
tests/fake_provider.py, reached through LiteLLM's OpenAI client via OPENAI_API_BASE.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import ClientSession, web

from tests.browser import (
    ASSISTANT,
    browser_page,
    free_port,
    login,
    running_app,
    screenshot,
    send,
)
from tests.conftest import add_user
from tests.fake_provider import ANSWER, FakeProvider

pytestmark = pytest.mark.browser

MODEL = "openai/fake"


@pytest.fixture(scope="module")
def provider():
    p = FakeProvider().start()
    yield p
    p.stop()


def fake_env(api_base: str) -> dict[str, str]:
    # LiteLLM resolves an openai/ model's base from OPENAI_BASE_URL, then OPENAI_API_BASE.
    return {
        "VTAI_MODEL": MODEL,
        "OPENAI_API_BASE": api_base,
        "OPENAI_BASE_URL": api_base,
        "OPENAI_API_KEY": "sk-test-not-a-real-key",
        "VTAI_REQUEST_TIMEOUT": "10",
    }


class SwitchableProvider:
    """A pass-through to the fake provider whose failure mode the test can change while the
    app keeps the same OPENAI_API_BASE, so Retry can meet a provider that has recovered."""

    def __init__(self, provider: FakeProvider, mode: str):
        self.provider = provider
        self.mode = mode
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        target = self.provider.url(self.mode) + "/chat/completions"
        async with (
            ClientSession() as session,
            session.post(target, data=body, headers={"Content-Type": "application/json"}) as up,
        ):
            response = web.StreamResponse(
                status=up.status,
                headers={"Content-Type": up.headers.get("Content-Type", "application/json")},
            )
            await response.prepare(request)
            async for chunk in up.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    async def __aenter__(self) -> SwitchableProvider:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._forward)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self._runner.cleanup()


async def test_tampered_session_cookie_lands_on_login(db_url, conn, tmp_path, provider):
    await add_user(conn, "mallet")
    async with (
        running_app(db_url, tmp_path, **fake_env(provider.url("ok"))) as base,
        browser_page() as page,
    ):
        await login(page, base, "mallet")
        context = page.context
        cookies = {c["name"]: c for c in await context.cookies()}
        assert "access_token" in cookies, sorted(cookies)
        forged = {**cookies["access_token"], "value": "eyJhbGciOiJIUzI1NiJ9.garbage.garbage"}
        await context.add_cookies([forged])
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        await page.reload(wait_until="domcontentloaded")
        await page.wait_for_selector("#email", timeout=30_000)
        await screenshot(page, "fault_tampered_cookie")
        assert "/login" in page.url
        assert await page.locator("#chat-input").count() == 0
        assert errors == []
        # The forged cookie gives no access to the API either, and the server survives it.
        status = await page.evaluate(
            "async (b) => (await fetch(b + '/user', {credentials: 'include'})).status", base
        )
        assert status == 401
        await login(page, base, "mallet")
        assert ANSWER.split()[0] in await send(page, "still there?")


async def test_attachments_are_off_and_text_still_answered(db_url, conn, tmp_path, provider):
    """The model reads no attachments, so the page offers none (docs/security.md); an upload
    sent anyway is refused before its body is read (tests/web/test_uploads.py)."""
    user = await add_user(conn, "attacher")
    async with (
        running_app(db_url, tmp_path, **fake_env(provider.url("ok"))) as base,
        browser_page() as page,
    ):
        await login(page, base, "attacher")
        assert await page.locator("input[type=file]").count() == 0
        status = await page.evaluate(
            """async (b) => (await fetch(b + '/project/file?session_id=x', {
                method: 'POST', credentials: 'include', body: new FormData()})).status""",
            base,
        )
        assert status == 403
        answer = await send(page, "Say hello.")
    assert ANSWER.split(".")[0] in answer and "tokens used" in answer
    row = await conn.fetchrow("select status from request_logs where end_user = $1", user.id)
    assert row["status"] == "success"


async def test_retry_after_provider_failure_answers_and_bills_once(
    db_url, conn, tmp_path, provider
):
    user = await add_user(conn, "retrier")
    async with (
        SwitchableProvider(provider, "500") as upstream,
        running_app(db_url, tmp_path, **fake_env(upstream.url)) as base,
        browser_page() as page,
    ):
        await login(page, base, "retrier")
        failed = await send(page, "Tell me something.")
        retry = page.get_by_role("button", name="Retry")
        await retry.wait_for(timeout=15_000)
        await screenshot(page, "fault_provider_500")
        upstream.mode = "ok"
        before = await page.locator(ASSISTANT).count()
        await retry.click()
        texts = await _wait_for_messages(page, before + 1)
        await screenshot(page, "fault_retry_answered")
        assert await page.get_by_role("button", name="Retry").count() == 0
    assert "server error" in failed and "retry" in failed.lower()
    assert ANSWER.split(".")[0] in texts[-1] and "tokens used" in texts[-1]
    rows = await conn.fetch(
        "select status, total_tokens, error from request_logs where end_user = $1"
        " order by created_at",
        user.id,
    )
    assert [r["status"] for r in rows] == ["failure", "success"]
    assert rows[0]["total_tokens"] == 0 and json.loads(rows[0]["error"])["code"] == "500"
    counter = await conn.fetchrow(
        "select used, reserved from usage_counters where end_user = $1", user.id
    )
    assert (counter["used"], counter["reserved"]) == (rows[1]["total_tokens"], 0)


async def _wait_for_messages(page, count: int, timeout: float = 60) -> list[str]:
    """Texts of the assistant messages once there are `count` and the last is final."""
    for _ in range(int(timeout / 0.2)):
        if (
            await page.locator(ASSISTANT).count() >= count
            and await page.locator("#chat-submit").is_visible()
        ):
            texts = await page.locator(ASSISTANT).all_inner_texts()
            # Final answers end with the quota line; a Retry action isn't always run with
            # the stop button showing, so "submit visible" alone can be mid-stream.
            if "tokens used" in texts[-1]:
                return texts
        await asyncio.sleep(0.2)
    await screenshot(page, "fault_timeout")
    raise TimeoutError(f"fewer than {count} assistant messages after {timeout}s")
