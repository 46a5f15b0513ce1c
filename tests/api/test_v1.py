"""The OpenAI-compatible API through the real server, driven by clients nobody here wrote: the
official `openai` SDK, `curl -N`, and LiteLLM as a client. The ledger is checked in Postgres.

The model behind it is tests/fake_provider.py, a FAKE OpenAI-compatible provider (real ones
can't be reached from here) that reports usage by its own byte-level tokenizer.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from datetime import UTC, datetime

import httpx
import openai
import pytest

from tests.api.v1_app import HELLO, MAX_TOKENS, MODEL
from tests.chainlit_client import chat

pytestmark = [pytest.mark.browser, pytest.mark.slow]


async def test_the_openai_sdk_gets_an_answer_whose_usage_is_what_was_charged(app):
    user, key = await app.user_with_key(token_limit=100_000)
    async with app.client(key) as client:
        reply = await client.chat.completions.create(model=MODEL, messages=HELLO)
    assert reply.choices[0].message.content and reply.choices[0].finish_reason in ("stop", "length")
    (row,) = await app.rows(user, 1)
    assert row["source"] == "api" and row["api_key_id"] == await app.key_id(key)
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
        # A path /v1 doesn't have is OpenAI's 404, not the chat's web page.
        with pytest.raises(openai.NotFoundError) as nowhere:
            await client.embeddings.create(model=MODEL, input="hi")
        assert nowhere.value.code == "unknown_url"
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


async def test_chat_and_api_share_one_counter_and_no_key_spends_another_users_quota(app, tmp_path):
    # Every cap on, so the day's and the dollars' counters are kept too.
    user, key = await app.user_with_key(
        token_limit=100_000, daily_limit=100_000, usd_limit=10, rpm=1000
    )
    other, _ = await app.user_with_key(token_limit=100_000)
    async with await chat(app.base, user.username, "correct horse battery") as client:
        await client.send("Hello from the chat")
        async with app.client(key) as api:
            await api.chat.completions.create(model=MODEL, messages=HELLO)
            await client.send("And again from the chat")
            stream = await api.chat.completions.create(model=MODEL, messages=HELLO, stream=True)
            async for _ in stream:
                pass
    rows = await app.rows(user, 4)
    assert sorted(r["source"] for r in rows) == ["api", "api", "chat", "chat"]
    assert {r["status"] for r in rows} == {"success"}
    assert await app.settled(user) == sum(r["counted_tokens"] for r in rows)
    assert await app.rows(other, 0) == []
    assert await app.sql("select * from vtai_verify_counters()") == []
    # The operator's own check, the real command against the app's database.
    verify = await asyncio.to_thread(app.vtai, "usage", "--verify", data_dir=tmp_path)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stdout.startswith("ok: usage counters and aggregates equal the ledger")


# Each run sets all four caps of the user's tier and makes one of them the tight one.
LOOSE = dict(token_limit=1_000_000, daily_limit=1_000_000, usd_limit=100, rpm=10_000)
CAPS = {
    "tokens": LOOSE | {"token_limit": 3_000},
    "daily": LOOSE | {"daily_limit": 3_000},
    # about 2,000 tokens at openai/fake's catalogue price
    "usd": LOOSE | {"usd_limit": 0.02},
    "rpm": LOOSE | {"rpm": 30},
}


async def caps_used(app, user) -> dict:
    """What each cap counted for `user`, from the counters and from the ledger."""
    (row,) = await app.sql(
        "select c.used, c.cost_used::float8 as cost, c.minute_requests,"
        " (select coalesce(sum(d.used), 0) from daily_counters d"
        "   where d.end_user = c.end_user and d.day_start = vtai_period_start('day', now()))"
        "   as today,"
        " (select coalesce(sum(counted_tokens), 0) from request_logs r"
        "   where r.end_user = c.end_user and r.period_start = c.period_start) as ledger,"
        " (select coalesce(sum(counted_tokens), 0) from request_logs r"
        "   where r.end_user = c.end_user and r.day_start = vtai_period_start('day', now()))"
        "   as ledger_today,"
        " (select coalesce(sum(total_cost), 0)::float8 from request_logs r"
        "   where r.end_user = c.end_user and r.period_start = c.period_start) as ledger_cost,"
        " (select coalesce(max(n), 0) from (select count(*) as n from request_logs r"
        "   where r.end_user = c.end_user and r.status <> 'refused'"
        "   group by date_trunc('minute', r.created_at)) m) as busiest_minute"
        " from usage_counters c where c.end_user = $1"
        " and c.period_start = vtai_period_start('month', now())",
        user.id,
    )
    return dict(row)


async def hammer(app, user, key, page=None) -> list:
    """50 API streams and two socket.io chats of five turns (and, with `page`, a browser chat
    of two), all at once. Returns the browser's replies."""
    first_turns = asyncio.Event()
    chats_started = [0]

    async def stream(client) -> None:
        await first_turns.wait()
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
            # The first turn of each chat is under way before the streams start, so a chat
            # turn is answered whichever cap binds; the rest race them.
            first = await c.send_raw("Chat message 0")
            await c.wait_for(
                lambda: any(e in ("stream_token", "task_end") for e, _ in c.events[first:])
            )
            chats_started[0] += 1
            if chats_started[0] == 2:
                first_turns.set()
            await c.collect(first)
            for i in range(1, 5):
                await c.send(f"Chat message {i}")

    async def browsing() -> list:
        from tests.browser import send

        await first_turns.wait()
        return [await send(page, f"Browser message {i}", timeout=60) for i in range(2)]

    async with app.client(key, max_retries=0) as client:
        jobs = [*(stream(client) for _ in range(50)), chatting(), chatting()]
        if page is not None:
            jobs.append(browsing())
        done = await asyncio.gather(*jobs)
    return done[-1] if page is not None else []


@pytest.mark.parametrize("tight", list(CAPS))
async def test_fifty_streams_and_chats_of_one_user_never_overshoot(app, tight):
    plan = CAPS[tight]
    user, key = await app.user_with_key(**plan)
    if tight == "rpm":
        # One minute's window for the whole run: the ledger's minutes are the turns' own
        # clocks, which may differ from the database's by a moment at the minute's edge.
        second = datetime.now(UTC).second + datetime.now(UTC).microsecond / 1e6
        if second > 50:
            await asyncio.sleep(60.5 - second)
    if tight == "tokens":
        # One real browser chat too, typing while the streams run.
        from tests.browser import browser_page, login

        async with browser_page() as page:
            await login(page, app.base, user.username)
            replies = await hammer(app, user, key, page)
        assert len(replies) == 2 and all(replies), replies
    else:
        await hammer(app, user, key)
    await app.no_reservations(user)
    used = await caps_used(app, user)
    # No cap overshoots: the period's tokens, today's, the dollars, the requests in a minute.
    assert used["used"] <= plan["token_limit"]
    assert used["today"] <= plan["daily_limit"]
    assert used["cost"] <= plan["usd_limit"] and used["ledger_cost"] <= plan["usd_limit"]
    assert used["busiest_minute"] <= plan["rpm"] and used["minute_requests"] <= plan["rpm"]
    # The counters are the ledger.
    assert used["used"] == used["ledger"] and used["today"] == used["ledger_today"]
    assert used["cost"] == pytest.approx(used["ledger_cost"], abs=1e-9)
    assert await app.sql("select * from vtai_verify_counters()") == []
    # The tight cap was reached, not dodged.
    reached = {
        "tokens": used["used"] > plan["token_limit"] // 2,
        "daily": used["today"] > plan["daily_limit"] // 2,
        "usd": used["cost"] > plan["usd_limit"] / 2,
        "rpm": used["busiest_minute"] == plan["rpm"],
    }
    assert reached[tight], used
    rows = await app.sql(
        "select source, status, additional_details::jsonb ->> 'reason' as reason"
        " from request_logs where end_user = $1",
        user.id,
    )
    refusals = {r["reason"] for r in rows if r["status"] == "refused"}
    assert refusals, "nothing was refused: the cap did not bind"
    expected = {
        "tokens": {"quota_exhausted", "prompt_exceeds_quota"},
        "daily": {"daily_exhausted", "prompt_exceeds_daily"},
        "usd": {"usd_exhausted", "prompt_exceeds_usd"},
        "rpm": {"rate_limited"},
    }[tight]
    assert refusals <= expected | {"short_answer_only"}, refusals
    # Chat turns were answered, not only refused.
    assert any(r["source"] == "chat" and r["status"] == "success" for r in rows)
