"""Plans through the real server, the way a user's client meets them: `chainlit run
vtai/main.py` driven over Chainlit's socket.io protocol (tests/chainlit_client.py), buttons
clicked with `POST /project/action`, and the ledger checked in Postgres afterwards.

The paid model is tests/fake_provider.py, a FAKE OpenAI-compatible server (real providers can't
be reached from here); the free model is the real local one, made free for the whole module
with the operator's one command (`vtai model weight 'local/*' 0`, here its SQL).
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import asyncpg
import pytest

from tests.browser import running_app
from tests.chainlit_client import chat
from tests.conftest import create_database, drop_database
from tests.fake_provider import FakeProvider
from tests.metered_app import MeteredApp
from vtai.metering.turn import reserve_prompt

pytestmark = [pytest.mark.browser, pytest.mark.slow]

MODEL = "openai/fake"
LOCAL = "local/smollm2-135m"
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def provider():
    p = FakeProvider().start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
async def app(pg_server, template_db, tmp_path_factory, provider):
    url = await create_database(pg_server, template_db)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("insert into model_weights (pattern, weight) values ('local/*', 0)")
    finally:
        await conn.close()
    api_base = provider.url("script")
    env = {
        "VTAI_MODEL": MODEL,
        "OPENAI_API_BASE": api_base,
        "OPENAI_BASE_URL": api_base,
        "OPENAI_API_KEY": "sk-test-not-a-real-key",
        "VTAI_MAX_TOKENS": str(MAX_TOKENS),
        "VTAI_REQUEST_TIMEOUT": "30",
    }
    async with running_app(url, tmp_path_factory.mktemp("plans"), **env) as base:
        yield MeteredApp(base, url)
    await drop_database(pg_server, url)


def _answers(client, mark: int) -> list[dict]:
    return [
        d
        for e, d in client.events[mark:]
        if e == "new_message" and isinstance(d, dict) and d.get("type") == "assistant_message"
    ]


async def test_a_model_outside_the_plan_is_refused_at_the_gate_and_nothing_is_sent(app, provider):
    user, tier = await app.user_on_plan(models=[MODEL, "local/*"])
    async with await chat(app.base, user.username, "correct horse battery") as client:
        first = await client.send("Say hello")
        assert first.answer and "tokens used" in first.text
        # The operator takes the chat's model out of the plan while the chat is open.
        await app.sql("update tiers set models = '{local/*}' where name = $1", tier)
        # The reservation the chat took ahead under the old plan goes back (plan_watch).
        await app.no_reservations(user)
        calls = len(provider.calls)
        refused = await client.send("Say hello again")
        assert f"doesn't include {MODEL}" in refused.text, refused.text
        assert "This chat now uses" in refused.text
        assert len(provider.calls) == calls  # nothing left the server
        # A client that asks for the paid model again is refused, and the chat stays free.
        await client.change_settings(model=MODEL)
        await client.wait_for(
            lambda: any(
                "not offered on your plan" in (d or {}).get("output", "")
                for e, d in client.events
                if e == "new_message"
            )
        )
        answered = await client.send("And once more")
        assert answered.answer, answered.text
    rows = await app.rows(user, 3)
    assert rows[1]["status"] == "refused"
    assert json.loads(rows[1]["additional_details"])["reason"] == "model_not_allowed"
    assert rows[2]["model"] == LOCAL and rows[2]["status"] == "success"
    assert rows[2]["weight"] == 0 and rows[2]["counted_tokens"] == 0
    assert len(provider.calls) == calls


async def test_a_weight_counts_against_the_quota_and_the_line_says_so(app):
    user, _ = await app.user_on_plan(token_limit=100_000)
    await app.sql(
        "insert into model_weights (pattern, weight) values ($1, 10)"
        " on conflict (pattern) do update set weight = 10",
        MODEL,
    )
    try:
        async with await chat(app.base, user.username, "correct horse battery") as client:
            reply = await client.send("Count this tenfold")
        assert "counts 10× against your quota" in reply.text, reply.text
        (row,) = await app.rows(user, 1)
        assert row["weight"] == 10 and row["counted_tokens"] == 10 * row["total_tokens"] > 0
        assert await app.used(user) == row["counted_tokens"]
        assert await app.sql("select * from vtai_verify_counters()") == []
    finally:
        await app.sql("delete from model_weights where pattern = $1", MODEL)


async def test_requests_per_minute_hold_at_the_boundary(app):
    user, _ = await app.user_on_plan(rpm=2)
    now = datetime.now(UTC)
    if now.second >= 40:
        # Three turns must fall in one minute; this wait is for the clock, not for the app.
        await asyncio.sleep(61 - now.second)
    async with await chat(app.base, user.username, "correct horse battery") as client:
        replies = [await client.send(f"Question {i}") for i in range(2)]
        mark = await client.send_raw("Question 2")
        replies.append(await client.collect(mark))
    assert replies[0].answer and replies[1].answer
    assert "2 requests this minute, the most" in replies[2].text, replies[2].text
    assert ["retry"] == [a["name"] for a in client.actions_since(mark)]
    rows = await app.rows(user, 3)
    assert [r["status"] for r in rows] == ["success", "success", "refused"]


async def test_at_the_limit_the_user_continues_on_the_free_model(app, provider):
    user, _ = await app.user_on_plan(token_limit=1_000)
    await app.spend(user, 1_000)
    async with await chat(app.base, user.username, "correct horse battery") as client:
        calls = len(provider.calls)
        mark = await client.send_raw("Tell me about tides")
        refused = await client.collect(mark)
        assert "You have used your token quota" in refused.text, refused.text
        assert "resets" in refused.text
        (button,) = [a for a in client.actions_since(mark) if a["name"] == "continue_free"]
        assert "free" in button["label"]
        clicked = await client.call_action(button)
        await client.wait_for(
            lambda: "tokens used" in "".join(d.get("output", "") for d in _answers(client, clicked))
        )
    rows = await app.rows(user, 3)
    answered = rows[-1]
    assert answered["model"] == LOCAL and answered["status"] == "success"
    assert answered["weight"] == 0 and answered["counted_tokens"] == 0
    assert answered["total_tokens"] > 0
    assert await app.used(user) == 1_000
    assert len(provider.calls) == calls


async def test_a_short_answer_is_a_choice_and_stays_inside_the_cap(app):
    user, _ = await app.user_on_plan(token_limit=5_000)
    text = "Briefly: why is the sky blue?"
    prompt = reserve_prompt(MODEL, [{"role": "user", "content": text}])
    await app.spend(user, 5_000 - prompt - 20)
    async with await chat(app.base, user.username, "correct horse battery") as client:
        mark = await client.send_raw(text)
        offered = await client.collect(mark)
        assert "enough for a short answer" in offered.text, offered.text
        buttons = {a["name"]: a for a in client.actions_since(mark)}
        assert "Shorter answer (about 20 tokens)" == buttons["shorter_answer"]["label"]
        assert "continue_free" in buttons
        clicked = await client.call_action(buttons["shorter_answer"])
        await client.wait_for(lambda: _answers(client, clicked))
    rows = await app.rows(user, 3)
    assert rows[-1]["status"] == "success" and rows[-1]["model"] == MODEL
    assert 0 < rows[-1]["completion_tokens"] <= 20
    assert await app.used(user) <= 5_000


async def test_a_model_without_a_price_is_refused_under_a_dollar_cap(app, provider):
    user, _ = await app.user_on_plan(usd_limit=1.5)
    async with await chat(app.base, user.username, "correct horse battery") as client:
        calls = len(provider.calls)
        reply = await client.send("Hello")
    assert f"{MODEL} has no known price" in reply.text, reply.text
    assert len(provider.calls) == calls


async def test_the_daily_cap_refuses_until_tomorrow_and_offers_the_free_model(app):
    user, _ = await app.user_on_plan(daily_limit=0)
    async with await chat(app.base, user.username, "correct horse battery") as client:
        mark = await client.send_raw("Hello")
        reply = await client.collect(mark)
        names = [a["name"] for a in client.actions_since(mark)]
    assert "You have used today's token quota" in reply.text, reply.text
    tomorrow = datetime.now(UTC).date().toordinal() + 1
    assert datetime.fromordinal(tomorrow).strftime("%Y-%m-%d 00:00 UTC") in reply.text
    assert names == ["continue_free"]
