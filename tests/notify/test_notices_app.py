"""Quota notices and the operator's webhooks through the real server (`chainlit run
vtai/main.py`): a chat over Chainlit's socket.io protocol (tests/chainlit_client.py), /v1 over
HTTP, a real local receiver for the webhooks (tests/notify/receiver.py), and Postgres checked.

The model is tests/fake_provider.py, a FAKE OpenAI-compatible provider (real ones can't be
reached from here): in its `ok` mode every turn is 11 prompt + 14 answer tokens, 25 in all.
"""

from __future__ import annotations

import asyncpg
import httpx
import pytest

from tests.browser import running_app
from tests.chainlit_client import chat
from tests.conftest import create_database, drop_database
from tests.fake_provider import FakeProvider
from tests.metered_app import MeteredApp
from tests.notify.receiver import Receiver
from tests.notify.test_delivery import SECRET, documented_verify
from vtai.api import keys

pytestmark = [pytest.mark.browser, pytest.mark.slow]

MODEL = "openai/fake"
TURN = 25
PASSWORD = "correct horse battery"
HELLO = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def provider():
    p = FakeProvider().start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def receiver():
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
async def app(pg_server, template_db, tmp_path_factory, provider, receiver):
    url = await create_database(pg_server, template_db)
    api_base = provider.url("ok")
    env = {
        "VTAI_MODEL": MODEL,
        "OPENAI_API_BASE": api_base,
        "OPENAI_BASE_URL": api_base,
        "OPENAI_API_KEY": "sk-test-not-a-real-key",
        "VTAI_MAX_TOKENS": "40",
        "VTAI_REQUEST_TIMEOUT": "30",
        "VTAI_WARN_AT": "80,100",
        "VTAI_WEBHOOK_URLS": receiver.url("ok"),
        "VTAI_WEBHOOK_SECRET": SECRET,
    }
    async with running_app(url, tmp_path_factory.mktemp("notify"), **env) as base:
        yield MeteredApp(base, url)
    await drop_database(pg_server, url)


async def _key(app: MeteredApp, user) -> str:
    conn = await asyncpg.connect(app.db_url)
    try:
        return (await keys.create(conn, user.id, "test key", actor="test"))[1]
    finally:
        await conn.close()


def _events(receiver: Receiver, type_: str, user) -> list[dict]:
    return [d.event for d in receiver.of("ok", type_) if d.event["data"]["user_id"] == str(user.id)]


async def test_a_chat_tells_each_threshold_once_per_cap_and_period(app, receiver):
    user, _ = await app.user_on_plan(token_limit=10_000, daily_limit=10_000)
    await app.spend(user, 7990)  # 79.9% of the period's tokens and of today's
    async with await chat(app.base, user.username, PASSWORD) as client:
        crossed = await client.send("Say hello")
    # One turn crossed 80% of two caps: two lines under the answer.
    assert "You have used 80% of your tokens this month (8,015 of 10,000 tokens)" in crossed.text
    assert "You have used 80% of today's tokens (8,015 of 10,000 tokens)" in crossed.text
    # A new chat (as a reload is) says nothing more: the notices are the database's.
    async with await chat(app.base, user.username, PASSWORD) as client:
        again = await client.send("Say hello")
    assert again.answer and "tokens used" in again.text and "You have used" not in again.text
    assert await app.used(user) == 7990 + 2 * TURN

    # The operator got each as a signed event, once.
    await receiver.wait_for(lambda: len(_events(receiver, "quota.threshold", user)) >= 2)
    events = _events(receiver, "quota.threshold", user)
    assert sorted((e["data"]["cap"], e["data"]["threshold"]) for e in events) == [
        ("daily", 80),
        ("tokens", 80),
    ]
    verify = documented_verify()
    for d in receiver.of("ok", "quota.threshold"):
        assert verify(SECRET, d.headers["VTAI-Signature"], d.body)

    # A new period starts afresh (the same SQL the app calls, at next month's first turn).
    (next_start,) = await app.sql(
        "select period_end from vtai_user_period($1, 'month', now())", user.id
    )
    await app.sql(
        "select vtai_record(jsonb_build_object('litellm_call_id', gen_random_uuid()::text,"
        " 'end_user', $1::text, 'status', 'success', 'model', 'gpt-4o-mini', 'prompt_tokens',"
        " 9000, 'completion_tokens', 0, 'created_at', $2::timestamptz))",
        str(user.id),
        next_start["period_end"],
    )
    told = await app.sql(
        "select cap, threshold from vtai_notices($1, 'month', $2, '{80,100}') order by cap",
        user.id,
        next_start["period_end"],
    )
    assert [(r["cap"], r["threshold"]) for r in told] == [("daily", 80), ("tokens", 80)]


async def test_the_api_says_it_in_a_header_or_a_trailing_sse_comment_once(app, receiver):
    user, _ = await app.user_on_plan(token_limit=10_000)
    await app.spend(user, 7990)
    key = await _key(app, user)
    auth = {"Authorization": f"Bearer {key}"}
    body = {"model": MODEL, "messages": HELLO}
    async with httpx.AsyncClient(base_url=app.base, headers=auth, timeout=60) as http:
        first = await http.post("/v1/chat/completions", json=body)
        second = await http.post("/v1/chat/completions", json=body)
        assert first.status_code == second.status_code == 200
        assert first.headers["x-vtai-quota-warning"] == "tokens 80%"
        assert "x-vtai-quota-warning" not in second.headers

        streamer, _ = await app.user_on_plan(token_limit=10_000)
        await app.spend(streamer, 7990)
        headers = {"Authorization": f"Bearer {await _key(app, streamer)}"}
        async with http.stream(
            "POST", "/v1/chat/completions", json={**body, "stream": True}, headers=headers
        ) as r:
            lines = [line async for line in r.aiter_lines() if line]
    assert lines[-2:] == [": x-vtai-quota-warning: tokens 80%", "data: [DONE]"]


async def test_refusals_at_a_cap_reach_the_operator_once_per_cap_and_period(app, receiver):
    user, _ = await app.user_on_plan(token_limit=100)
    await app.spend(user, 100)
    key = await _key(app, user)
    async with httpx.AsyncClient(base_url=app.base, timeout=60) as http:
        for _ in range(3):
            r = await http.post(
                "/v1/chat/completions",
                json={"model": MODEL, "messages": HELLO},
                headers={"Authorization": f"Bearer {key}"},
            )
            assert r.status_code == 429, r.text
    (event,) = await receiver.wait_for(lambda: _events(receiver, "quota.refused", user))
    assert event["data"]["cap"] == "tokens" and event["data"]["reason"] == "quota_exhausted"
    await app.rows(user, 4)  # the spend and three refused rows
    (row,) = await app.sql(
        "select count(*) as n from webhook_events where type = 'quota.refused'"
        " and payload ->> 'user_id' = $1",
        str(user.id),
    )
    assert row["n"] == 1
