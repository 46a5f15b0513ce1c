"""The OpenAI-compatible API through the real server, driven by clients nobody here wrote: the
official `openai` SDK, `curl -N`, and LiteLLM as a client. The ledger is checked in Postgres.

The model behind it is tests/fake_provider.py, a FAKE OpenAI-compatible provider (real ones
can't be reached from here) that reports usage by its own byte-level tokenizer.
"""

from __future__ import annotations

import asyncio
import json
import subprocess

import asyncpg
import httpx
import openai
import pytest

from tests.browser import running_app
from tests.chainlit_client import chat
from tests.conftest import create_database, drop_database
from tests.fake_provider import FakeProvider
from tests.metered_app import MeteredApp
from vtai.api import keys

pytestmark = [pytest.mark.browser, pytest.mark.slow]

MODEL = "openai/fake"
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def provider():
    p = FakeProvider().start()
    yield p
    p.stop()


class App(MeteredApp):
    async def user_with_key(self, **plan):
        """A user on a tier of their own, and a key of theirs."""
        user, _ = await self.user_on_plan(**plan)
        conn = await asyncpg.connect(self.db_url)
        try:
            _, plain = await keys.create(conn, user.id, "test key", actor="test")
        finally:
            await conn.close()
        return user, plain

    def client(self, key: str, **kw) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.base}/v1", api_key=key, **kw)


@pytest.fixture(scope="module")
async def app(pg_server, template_db, tmp_path_factory, provider):
    url = await create_database(pg_server, template_db)
    api_base = provider.url("script")
    env = {
        "VTAI_MODEL": MODEL,
        "OPENAI_API_BASE": api_base,
        "OPENAI_BASE_URL": api_base,
        "OPENAI_API_KEY": "sk-test-not-a-real-key",
        "VTAI_MAX_TOKENS": str(MAX_TOKENS),
        "VTAI_REQUEST_TIMEOUT": "30",
        "VTAI_MAX_BODY_BYTES": "65536",
        "VTAI_MAX_MESSAGE_CHARS": "5000",
    }
    async with running_app(url, tmp_path_factory.mktemp("api"), **env) as base:
        yield App(base, url)
    await drop_database(pg_server, url)


HELLO = [{"role": "user", "content": "Say hello"}]


async def test_the_openai_sdk_gets_an_answer_whose_usage_is_what_was_charged(app):
    user, key = await app.user_with_key(token_limit=100_000)
    async with app.client(key) as client:
        reply = await client.chat.completions.create(model=MODEL, messages=HELLO)
    assert reply.choices[0].message.content and reply.choices[0].finish_reason in ("stop", "length")
    (row,) = await app.rows(user, 1)
    assert row["source"] == "api" and row["api_key_id"] is not None
    assert row["status"] == "success" and row["model"] == MODEL
    assert reply.usage.prompt_tokens == row["prompt_tokens"]
    assert reply.usage.completion_tokens == row["completion_tokens"]
    assert await app.settled(user) == row["counted_tokens"] == row["total_tokens"]


async def test_the_openai_sdk_streams_with_usage_at_the_end(app):
    user, key = await app.user_with_key(token_limit=100_000)
    async with app.client(key) as client:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "system", "content": "Be brief."}, *HELLO],
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces, usage = [], None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            if chunk.usage:
                usage = chunk.usage
    assert len(pieces) > 3 and usage is not None
    (row,) = await app.rows(user, 1)
    assert usage.total_tokens == row["total_tokens"] > 0
    assert row["source"] == "api"


async def test_curl_streams_server_sent_events(app):
    _, key = await app.user_with_key(token_limit=100_000)
    body = json.dumps({"model": MODEL, "messages": HELLO, "stream": True})
    done = await asyncio.to_thread(
        subprocess.run,
        [
            "curl", "-sS", "-N", f"{app.base}/v1/chat/completions",
            "-H", f"Authorization: Bearer {key}", "-H", "Content-Type: application/json",
            "-d", body,
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    events = [line for line in done.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]", done.stdout[-500:]
    first = json.loads(events[0][6:])
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"]["role"] == "assistant"


async def test_litellm_as_a_client(app):
    import litellm

    user, key = await app.user_with_key(token_limit=100_000)
    reply = await litellm.acompletion(
        model=f"openai/{MODEL}", api_base=f"{app.base}/v1", api_key=key, messages=HELLO
    )
    assert reply.choices[0].message.content
    (row,) = await app.rows(user, 1)
    assert row["source"] == "api" and reply.usage.total_tokens == row["total_tokens"]


async def test_errors_come_in_openai_shape_and_map_to_the_sdk_classes(app, provider):
    user, key = await app.user_with_key(token_limit=100_000, models=["local/*"])
    async with app.client("vtai-not-a-key", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            await bad.chat.completions.create(model=MODEL, messages=HELLO)
    calls = len(provider.calls)
    async with app.client(key, max_retries=0) as client:
        with pytest.raises(openai.NotFoundError) as missing:
            await client.chat.completions.create(model="openai/gpt-9-nonexistent", messages=HELLO)
        assert missing.value.code == "model_not_found"
        with pytest.raises(openai.PermissionDeniedError):
            await client.chat.completions.create(model=MODEL, messages=HELLO)
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=0)
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x" * 6000}]
            )
    assert len(provider.calls) == calls
    async with httpx.AsyncClient(base_url=app.base) as http:
        auth = {"Authorization": f"Bearer {key}"}
        r = await http.post("/v1/chat/completions", headers=auth, json={"model": MODEL})
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("messages")
        r = await http.post(
            "/v1/chat/completions", headers=auth, json={"model": MODEL, "messages": "hi"}
        )
        assert r.status_code == 400
        deep = await http.post(
            "/v1/chat/completions", headers=auth, content=b"[" * 50_000 + b"]" * 50_000
        )
        assert deep.status_code == 413  # over this app's 64 KiB before it is even parsed
        deep = await http.post("/v1/chat/completions", headers=auth, content=b"[" * 30_000)
        assert deep.status_code == 400 and "nested too deeply" in deep.text
        many = [{"role": "user", "content": "hi"}] * 257
        r = await http.post(
            "/v1/chat/completions", headers=auth, json={"model": MODEL, "messages": many}
        )
        assert r.status_code == 400 and "at most 256" in r.json()["error"]["message"]
        r = await http.post(
            "/v1/chat/completions", headers=auth, content=b"{" + b" " * 70_000 + b"}"
        )
        assert r.status_code == 413 and "VTAI_MAX_BODY_BYTES" in r.json()["error"]["message"]
        # A web page elsewhere can't use a key pasted into it.
        r = await http.post(
            "/v1/chat/completions",
            headers={**auth, "Origin": "http://evil.example"},
            json={"model": MODEL, "messages": HELLO},
        )
        assert r.status_code == 403
        models = await http.get("/v1/models", headers=auth)
        assert [m["id"] for m in models.json()["data"]] == ["local/smollm2-135m"]
    # Every refusal of a known key is a row, as in the chat (the cross-origin 403 never
    # reached the API); nothing of a refused body is kept.
    rows = await app.rows(user, 10)
    reasons = sorted(json.loads(r["additional_details"]).get("reason") for r in rows)
    assert reasons == [
        "bad_request",
        "bad_request",
        "bad_request",
        "bad_request",
        "bad_request",
        "message_too_long",
        "model_not_allowed",
        "model_not_offered",
        "request_too_large",
        "request_too_large",
    ] and all(r["status"] == "refused" and r["total_tokens"] == 0 for r in rows)


async def test_a_hard_quota_is_429_and_the_sdk_does_not_retry_it(app, provider):
    user, key = await app.user_with_key(token_limit=10)
    calls = len(provider.calls)
    async with app.client(key) as client:  # the SDK's default: 2 retries
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(model=MODEL, messages=HELLO)
    headers = refused.value.response.headers
    assert headers["x-should-retry"] == "false"
    assert int(headers["retry-after"]) > 60 and headers["x-ratelimit-reset-tokens"].endswith("s")
    assert refused.value.body["code"] in ("prompt_exceeds_quota", "quota_exhausted")
    assert len(await app.rows(user, 1)) == 1  # asked once: no retry
    assert len(provider.calls) == calls


async def test_a_revoked_key_is_refused_on_the_next_request(app):
    user, key = await app.user_with_key(token_limit=100_000)
    async with app.client(key, max_retries=0) as client:
        await client.chat.completions.create(model=MODEL, messages=HELLO)
        await app.sql("update api_keys set revoked_at = now() where user_id = $1", user.id)
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model=MODEL, messages=HELLO)


async def test_a_client_gone_mid_stream_is_charged_as_a_stop(app, provider):
    user, key = await app.user_with_key(token_limit=100_000)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "A long story please #mode:slow"}],
        "stream": True,
    }
    async with httpx.AsyncClient(base_url=app.base, timeout=60) as http:
        async with http.stream(
            "POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as r:
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= 4:
                    break
    (row,) = await app.rows(user, 1)
    details = json.loads(row["additional_details"])
    assert details["aborted"] is True and row["completion_tokens"] >= 3
    assert await app.settled(user) == row["total_tokens"] > 0


async def test_chat_and_api_share_one_counter_and_no_key_spends_another_users_quota(app):
    user, key = await app.user_with_key(token_limit=100_000)
    other, _ = await app.user_with_key(token_limit=100_000)
    async with await chat(app.base, user.username, "correct horse battery") as client:
        await client.send("Hello from the chat")
    async with app.client(key) as api:
        await api.chat.completions.create(model=MODEL, messages=HELLO)
    rows = await app.rows(user, 2)
    assert sorted(r["source"] for r in rows) == ["api", "chat"]
    assert await app.settled(user) == sum(r["counted_tokens"] for r in rows)
    assert await app.rows(other, 0) == []
    assert await app.sql("select * from vtai_verify_counters()") == []


async def test_fifty_streams_and_chats_of_one_user_never_overshoot(app):
    limit = 3_000
    user, key = await app.user_with_key(token_limit=limit)

    async def stream(client) -> None:
        try:
            s = await client.chat.completions.create(
                model=MODEL, messages=HELLO, stream=True, max_tokens=MAX_TOKENS
            )
            async for _ in s:
                pass
        except openai.RateLimitError:
            pass

    async def chatting() -> None:
        async with await chat(app.base, user.username, "correct horse battery") as c:
            for i in range(5):
                await c.send(f"Chat message {i}")

    async with app.client(key, max_retries=0) as client:
        await asyncio.gather(*(stream(client) for _ in range(50)), chatting(), chatting())
    used = await app.settled(user)
    rows = await app.sql(
        "select coalesce(sum(counted_tokens), 0)::bigint as n from request_logs"
        " where end_user = $1",
        user.id,
    )
    assert used == rows[0]["n"] <= limit
    assert used > limit // 2  # the cap was reached, not dodged
    assert await app.sql("select * from vtai_verify_counters()") == []
