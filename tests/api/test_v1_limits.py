"""/v1 at the plan's limits, through the real server (tests/api/conftest.py): the 429 of each
cap with its own reset and remainder, max_tokens clamped to the quota left, history metered
as prompt, and a key that spends only its owner's quota whatever the body says.

The model is tests/fake_provider.py, a FAKE OpenAI-compatible provider that counts a token per
byte and records what it was asked."""

from __future__ import annotations

import json
import re
import time
import uuid

import httpx
import openai
import pytest

from tests.api.v1_app import HELLO, MODEL
from tests.fake_provider import byte_tokens

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def seconds(duration: str) -> int:
    """OpenAI's `1h2m3s` as seconds."""
    assert re.fullmatch(r"(\d+h)?(\d+m)?\d+s", duration), duration
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([hms])", duration))


async def refusals(app, user, count: int) -> list[str]:
    rows = await app.rows(user, count)
    refused = [r for r in rows if r["status"] == "refused"]
    return [json.loads(r["additional_details"]).get("reason") for r in refused]


def body_with(provider, marker: str) -> dict:
    (body,) = [b for b in provider.bodies if marker in json.dumps(b["messages"])]
    return body


async def test_the_daily_cap_is_a_429_that_lifts_at_the_days_end(app, provider):
    user, key = await app.user_with_key(token_limit=1_000_000, daily_limit=100)
    await app.spend(user, 90)  # today's tokens: 10 left, not enough for the prompt
    (day,) = await app.sql("select vtai_period_start('day', now()) + interval '1 day' as end")
    calls = len(provider.calls)
    async with app.client(key) as client:  # the SDK's default: 2 retries
        with pytest.raises(openai.RateLimitError) as short:
            await client.chat.completions.create(model=MODEL, messages=HELLO)
        await app.spend(user, 10)
        with pytest.raises(openai.RateLimitError) as spent:
            await client.chat.completions.create(model=MODEL, messages=HELLO)
        # The SDK's own rule: a spent quota is not retried.
        assert not client._should_retry(spent.value.response)
    assert short.value.code == "prompt_exceeds_daily" and spent.value.code == "daily_exhausted"
    assert short.value.type == "insufficient_quota"
    reset = day["end"].timestamp()
    for refused, left in ((short.value, "10"), (spent.value, "0")):
        headers = refused.response.headers
        assert refused.status_code == 429
        assert headers["x-should-retry"] == "false"
        # What is left today, not the period's 1,000,000.
        assert headers["x-ratelimit-remaining-tokens"] == left
        assert headers["x-ratelimit-limit-tokens"] == "100"
        assert abs(time.time() + int(headers["retry-after"]) - reset) <= 2
        assert abs(time.time() + seconds(headers["x-ratelimit-reset-tokens"]) - reset) <= 2
    # Each refusal is one ledger row (asked once each: no retry), the model never called.
    assert await refusals(app, user, 4) == ["prompt_exceeds_daily", "daily_exhausted"]
    assert len(provider.calls) == calls


async def test_the_dollar_cap_is_a_429_with_the_dollars_left(app, provider):
    # $0.0001 is less than the prompt alone costs at openai/fake's catalogue price.
    user, key = await app.user_with_key(token_limit=1_000_000, usd_limit=0.0001)
    (period,) = await app.sql(
        "select vtai_period_end('month', vtai_period_start('month', now())) as end"
    )
    async with app.client(key) as client:
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(model=MODEL, messages=HELLO)
    headers = refused.value.response.headers
    assert refused.value.code == "prompt_exceeds_usd" and headers["x-should-retry"] == "false"
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    assert (headers["x-vtai-limit-usd"], headers["x-vtai-remaining-usd"]) == ("0.0001", "0.0001")
    assert abs(time.time() + int(headers["retry-after"]) - period["end"].timestamp()) <= 2
    assert await refusals(app, user, 1) == ["prompt_exceeds_usd"]


async def test_the_request_rate_is_a_429_that_lifts_at_the_minutes_end(app, provider):
    user, key = await app.user_with_key(token_limit=1_000_000, rpm=2)
    async with app.client(key, max_retries=0) as client:
        for _ in range(6):  # 2 a minute: the third is refused, unless a minute began between
            sent = time.time()
            try:
                await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)
            except openai.RateLimitError as exc:
                refused, received = exc, time.time()
                break
        else:
            pytest.fail("never rate limited")
        # Not a spent quota: the SDK retries it, after Retry-After.
        assert client._should_retry(refused.response)
    headers = refused.response.headers
    assert refused.status_code == 429 and refused.code == "rate_limit_exceeded"
    assert refused.type == "rate_limit_error"
    assert "x-should-retry" not in headers
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert "x-ratelimit-remaining-tokens" not in headers
    minute_ends = {(int(t) // 60 + 1) * 60 for t in (sent, received)}
    wait = int(headers["retry-after"])
    assert 0 <= wait <= 60
    assert any(abs(received + wait - end) <= 2 for end in minute_ends), (wait, minute_ends)
    reset = seconds(headers["x-ratelimit-reset-requests"])
    assert any(abs(received + reset - end) <= 2 for end in minute_ends), (reset, minute_ends)
    rows = await app.rows(user, 3)
    assert [r["status"] for r in rows][-1] == "refused"
    assert (await refusals(app, user, 3))[-1] == "rate_limited"


async def test_max_tokens_is_clamped_to_what_the_quota_leaves_and_cut_with_length(app, provider):
    # With room, max_tokens reaches the model as asked.
    user, key = await app.user_with_key(token_limit=1_000_000)
    marker = f"roomy {uuid.uuid4().hex[:6]}"
    async with app.client(key, max_retries=0) as client:
        reply = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": marker}], max_tokens=30
        )
    assert body_with(provider, marker)["max_tokens"] == 30
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 30

    # A quota that leaves 200 tokens: the prompt's reservation (an upper bound for a model
    # without an exact tokenizer) and fewer answer tokens than asked.
    limit = 1_000
    for stream in (False, True):
        user, key = await app.user_with_key(token_limit=limit)
        await app.spend(user, limit - 200)
        marker = f"tight {uuid.uuid4().hex[:6]}"
        messages = [{"role": "user", "content": marker}]
        async with app.client(key, max_retries=0) as client:
            if stream:
                chunks = await client.chat.completions.create(
                    model=MODEL, messages=messages, max_tokens=30, stream=True
                )
                finish = [c.choices[0].finish_reason async for c in chunks if c.choices][-1]
            else:
                reply = await client.chat.completions.create(
                    model=MODEL, messages=messages, max_tokens=30
                )
                finish = reply.choices[0].finish_reason
        clamped = body_with(provider, marker)["max_tokens"]
        assert 1 <= clamped < 30 and finish == "length", (stream, clamped, finish)
        (_, row) = await app.rows(user, 2)
        assert row["source"] == "api" and row["completion_tokens"] == clamped
        assert json.loads(row["additional_details"])["max_tokens"] == clamped
        assert await app.settled(user) <= limit


async def test_history_in_the_request_is_metered_as_prompt(app, provider):
    user, key = await app.user_with_key(token_limit=1_000_000)
    earlier = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital of France."},
    ]
    async with app.client(key, max_retries=0) as client:
        alone = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
        with_history = await client.chat.completions.create(
            model=MODEL, messages=[*earlier, *HELLO], max_tokens=2
        )
    assert len(provider.bodies[-1]["messages"]) == 3
    rows = await app.rows(user, 2)
    assert [r["prompt_tokens"] for r in rows] == [
        alone.usage.prompt_tokens,
        with_history.usage.prompt_tokens,
    ]
    # The provider counts a token per byte and 4 per message: the history is charged in full.
    assert rows[1]["prompt_tokens"] - rows[0]["prompt_tokens"] == byte_tokens(earlier) - 3
    assert await app.settled(user) == sum(r["counted_tokens"] for r in rows)


async def test_a_key_spends_only_its_owners_quota_whoever_the_body_names(app, provider):
    ana, ana_key = await app.user_with_key(token_limit=100_000, models=["openai/*"])
    bob, bob_key = await app.user_with_key(token_limit=100_000, models=["local/*"])
    other = str(bob.id)
    impostor = {
        "x-vtai-user": other,
        "x-user-id": other,
        "x-end-user": other,
        "openai-organization": other,
    }
    async with app.client(ana_key, max_retries=0) as client:
        await client.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            user=other,
            metadata={"user_id": other, "end_user": other},
            extra_headers=impostor,
            extra_body={"end_user": other, "user_id": other},
        )
        stream = await client.chat.completions.create(
            model=MODEL, messages=HELLO, user=other, stream=True, extra_headers=impostor
        )
        async for _ in stream:
            pass
        # The models are the key owner's plan's, not the one named.
        models = await client.models.list(extra_headers=impostor)
    assert [m.id for m in models.data] == [MODEL]
    rows = await app.rows(ana, 2)
    assert {(r["source"], r["status"]) for r in rows} == {("api", "success")}
    assert {r["api_key_id"] for r in rows} == {await app.key_id(ana_key)}
    await app.settled(ana)
    assert await app.used(ana) == sum(r["counted_tokens"] for r in rows) > 0
    assert await app.rows(bob, 0) == [] and await app.used(bob) == 0
    # Nothing of the body's user reached the model either.
    assert other not in json.dumps(provider.bodies[-2:])

    # /v1 has nothing that reads another user's usage: no usage route, for any key (an
    # unknown path is OpenAI's 404, not the chat's page).
    async with httpx.AsyncClient(base_url=app.base, timeout=30) as http:
        auth = {"Authorization": f"Bearer {ana_key}", **impostor}
        for path in (
            "/v1/usage",
            f"/v1/usage/{other}",
            f"/v1/users/{other}",
            "/v1/dashboard/billing/usage",
            "/v1/organization/usage/completions",
        ):
            r = await http.get(path, headers=auth)
            assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url", path
            assert set(r.json()) == {"error"} and bob.username not in r.text, path
        bobs = await http.get("/v1/models", headers={"Authorization": f"Bearer {bob_key}"})
    assert [m["id"] for m in bobs.json()["data"]] == ["local/smollm2-135m"]
