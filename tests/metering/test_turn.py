"""A chat turn through the real LiteLLM call path and callback, into a real Postgres.

Model content doesn't matter here, so the model is LiteLLM's own mock_response.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from tests.conftest import add_user, offering
from vtai.metering import rows
from vtai.metering.rows import Facts, Tokens
from vtai.metering.turn import TurnRequest, TurnRunner

MODEL = "gpt-4o-mini"


async def wait_for_rows(conn, n, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        count = await conn.fetchval("select count(*) from request_logs")
        if count >= n or asyncio.get_running_loop().time() > deadline:
            return count
        await asyncio.sleep(0.05)


def runner_for(services, model=MODEL, **options):
    """A runner on a server whose default model is `model`: the one these tests ask for."""
    runner = TurnRunner(
        services.gate,
        services.ledger,
        services.callback.notes,
        offering(services.settings, model),
        call_options=options,
    )
    runner.plan_watch = services.runner.plan_watch
    return runner


def request(user, text="hello there", history=None, session="chat-1"):
    return TurnRequest(user.id, session, MODEL, history or [], text)


async def collect(runner, req):
    tokens = []

    async def on_token(t):
        tokens.append(t)

    outcome = await runner.run(req, on_token)
    return outcome, tokens


async def test_answer_is_streamed_and_logged_once(services, conn):
    user = await add_user(conn)
    runner = runner_for(services, mock_response="The quick brown fox jumps over the dog.")
    outcome, tokens = await collect(runner, request(user))
    assert outcome.kind == "answered" and len(tokens) > 1
    assert outcome.reply == "The quick brown fox jumps over the dog."
    assert await wait_for_rows(conn, 1) == 1
    r = await conn.fetchrow("select * from request_logs")
    assert r["status"] == "success" and r["end_user"] == user.id
    assert r["session_id"] == "chat-1" and r["litellm_call_id"] == outcome.call_id
    assert r["prompt_tokens"] > 0 and r["completion_tokens"] > 0
    assert r["total_tokens"] == r["prompt_tokens"] + r["completion_tokens"]
    assert r["total_cost"] > 0  # LiteLLM's price for gpt-4o-mini
    details = r["additional_details"]
    # mock_response sends no usage of its own: LiteLLM counts it, so the row says estimated
    # (tests/metering/test_provider_faults.py covers a provider that reports usage).
    assert '"tier": "free"' in details and '"estimated": true' in details
    assert await conn.fetch("select * from vtai_verify_counters()") == []
    assert await conn.fetchval("select reserved from usage_counters") == 0
    assert outcome.history[-1] == {"role": "assistant", "content": outcome.reply}


async def test_quota_is_per_user_not_per_chat(services, conn):
    user = await add_user(conn)
    runner = runner_for(services, mock_response="ok " * 20)
    for session in ("chat-a", "chat-b"):
        await collect(runner, request(user, session=session))
    await wait_for_rows(conn, 2)
    assert await conn.fetchval("select count(*) from usage_counters") == 1
    used = await conn.fetchval("select used from usage_counters where end_user = $1", user.id)
    assert used == await conn.fetchval("select sum(total_tokens) from request_logs")


async def test_refusal_is_clear_and_logged(services, conn):
    user = await add_user(conn)
    await conn.execute("update tiers set token_limit = 30 where name = 'free'")
    # mock_response ignores max_tokens, so keep the answer short; real providers honour it
    runner = runner_for(services, mock_response="word " * 5)
    outcomes = [(await collect(runner, request(user)))[0] for _ in range(4)]
    refused = [o for o in outcomes if o.kind == "refused"]
    assert refused, [o.kind for o in outcomes]
    text = refused[0].notice
    assert "free tier" in text and "of 30 tokens" in text and "resets" in text
    await wait_for_rows(conn, 4)
    statuses = [r["status"] for r in await conn.fetch("select status from request_logs")]
    assert "refused" in statuses
    assert await conn.fetchval("select sum(total_tokens) from request_logs") <= 30


async def test_empty_message_is_not_sent(services, conn):
    user = await add_user(conn)
    outcome, tokens = await collect(runner_for(services, mock_response="x"), request(user, "  \n"))
    assert outcome.kind == "invalid" and "Empty message" in outcome.notice and not tokens
    assert await conn.fetchval("select count(*) from request_logs") == 0


async def test_provider_failure_is_one_line_and_not_charged(services, conn):
    user = await add_user(conn)
    runner = runner_for(services, mock_response=Exception("upstream exploded"))
    outcome, _ = await collect(runner, request(user))
    assert outcome.kind == "failed" and "\n" not in outcome.notice
    assert "upstream exploded" not in outcome.notice
    await wait_for_rows(conn, 1)
    await services.flush()  # LiteLLM's own failure hook must not add a second row
    r = await conn.fetchrow("select status, total_tokens, error from request_logs")
    assert r["status"] == "failure" and r["total_tokens"] == 0
    assert "InternalServerError" in r["error"]
    assert await conn.fetchval("select count(*) from request_logs") == 1
    assert await conn.fetchval("select reserved + used from usage_counters") == 0


async def test_nul_bytes_and_lone_surrogates_are_stored_safely(services, conn):
    user = await add_user(conn)
    runner = runner_for(services, mock_response="fine")
    outcome, _ = await collect(runner, request(user, "a\x00b \ud800 c"))
    assert outcome.kind == "answered"
    await wait_for_rows(conn, 1)
    stored = await conn.fetchval("select messages::text from request_logs")
    assert "a\\ufffdb" in stored.lower() or "a\ufffdb" in stored


@pytest.mark.parametrize("mode", ["none", "redacted"])
async def test_log_content_modes_keep_tokens(db_url, tmp_path, conn, mode):
    from tests.conftest import make_settings
    from vtai.services import Services

    s = await Services.start(make_settings(db_url, tmp_path, log_content=mode), replay=False)
    try:
        user = await add_user(conn)
        await collect(runner_for(s, mock_response="secret answer"), request(user, "secret q"))
        await wait_for_rows(conn, 1)
        r = await conn.fetchrow(
            "select messages::text, response::text, total_tokens from request_logs"
        )
        assert r["total_tokens"] > 0
        assert "secret" not in (r["messages"] or "") and "secret" not in (r["response"] or "")
        if mode == "redacted":
            assert "sha256" in r["messages"]
    finally:
        await s.stop()


async def test_stopped_stream_is_charged_for_what_was_produced(services, conn):
    user = await add_user(conn)
    runner = runner_for(services, mock_response="one two three four five six seven eight " * 20)
    seen = []

    async def on_token(t):
        seen.append(t)
        if len(seen) == 3:
            raise asyncio.CancelledError  # what Chainlit's stop button does to the task

    with pytest.raises(asyncio.CancelledError):
        await runner.run(request(user), on_token)
    await wait_for_rows(conn, 1)
    await runner.drain()
    r = await conn.fetchrow(
        "select status, completion_tokens, additional_details from request_logs"
    )
    assert r["status"] == "success" and r["completion_tokens"] > 0
    assert '"aborted": true' in r["additional_details"]
    assert await conn.fetchval("select count(*) from request_logs") == 1
    assert await conn.fetchval("select reserved from usage_counters") == 0


async def test_unknown_user_is_refused(services, conn):
    ghost = type("Ghost", (), {"id": uuid.uuid4()})()
    outcome, _ = await collect(runner_for(services, mock_response="x"), request(ghost))
    assert outcome.kind == "refused" and "no longer exists" in outcome.notice


async def test_the_reply_returns_before_litellm_ends_the_stream_and_the_full_row_wins(
    services, conn
):
    user = await add_user(conn)
    runner = runner_for(services, mock_response="The quick brown fox.")
    outcome, _ = await collect(runner, request(user))
    # The stream's end (LiteLLM's final build and its success hooks) is still under way.
    assert outcome.kind == "answered" and outcome.usage["total_tokens"] > 0
    assert runner._background
    await services.flush()
    assert await wait_for_rows(conn, 1) == 1
    details = await conn.fetchval("select additional_details from request_logs")
    assert '"provisional"' not in details and '"tier": "free"' in details
    assert len(services.callback.notes) == 0  # the hook took the call's entry


class _TailFails:
    """STAND-IN for a provider stream whose end breaks after the usage chunk (LiteLLM can't be
    made to fail there on cue): iterating raises what a dropped connection raises."""

    def __init__(self):
        self.closed = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        raise ConnectionResetError("connection reset by peer")

    async def aclose(self):
        self.closed = True


async def test_if_the_stream_end_fails_the_row_held_at_the_answer_is_recorded(services, conn):
    user = await add_user(conn)
    runner = runner_for(services)
    facts = Facts(str(uuid.uuid4()), str(user.id), "chat-1", MODEL)
    call = services.callback.notes.open(facts)
    call.provisional = services.ledger.hold(
        rows.build(facts, "success", "full", usage=Tokens(12, 5), details={"provisional": True})
    )
    stream = _TailFails()
    await runner._finish_stream(stream, call)
    assert stream.closed and facts.call_id not in services.callback.notes
    assert await call.settled is True
    assert await wait_for_rows(conn, 1) == 1
    r = await conn.fetchrow("select status, total_tokens from request_logs")
    assert (r["status"], r["total_tokens"]) == ("success", 17)
    assert await conn.fetch("select * from vtai_verify_counters()") == []


# --- A chat longer than the quota left ----------------------------------------------------------

LONG_HISTORY = [
    {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}: " + "word " * 120}
    for i in range(6)
]


async def test_a_chat_longer_than_the_quota_left_drops_its_oldest_turns_and_answers(services, conn):
    user = await add_user(conn)
    await conn.execute("update tiers set token_limit = 1000 where name = 'free'")
    runner = runner_for(services, mock_response="short answer")
    outcome, _ = await collect(runner, request(user, history=LONG_HISTORY))
    assert outcome.kind == "answered", outcome.notice
    assert "oldest 6 messages were left out" in outcome.notice
    assert outcome.history[0]["content"] == "hello there" and outcome.trimmed == 6
    await outcome.settled
    row = await conn.fetchrow("select messages, additional_details from request_logs")
    assert '"trimmed_messages": 6' in row["additional_details"]
    assert "turn 0" not in row["messages"]
    assert await conn.fetchval("select used from usage_counters") <= 1000
    assert await conn.fetch("select * from vtai_verify_counters()") == []


async def test_a_message_larger_than_the_quota_left_is_refused_as_such(services, conn):
    user = await add_user(conn)
    await conn.execute("update tiers set token_limit = 100 where name = 'free'")
    runner = runner_for(services, mock_response="x")
    outcome, _ = await collect(runner, request(user, "a question " * 20, history=LONG_HISTORY))
    assert outcome.kind == "refused"
    assert outcome.notice.startswith("Your message is larger than what is left of your token")
    assert "100 left" in outcome.notice


def test_the_refusal_says_whether_the_message_or_the_chat_is_too_long():
    from vtai.metering.gate import Grant
    from vtai.metering.refusal import refusal

    grant = Grant(False, "prompt_exceeds_quota", tier="free", token_limit=10_000, used=9_500)
    chat = refusal(grant, "month", "gpt-4o-mini", message_tokens=120)
    assert chat.startswith(
        "This conversation is too long for the 500 tokens left in your token quota"
    )
    message = refusal(grant, "month", "gpt-4o-mini", message_tokens=600)
    assert message.startswith("Your message is larger than what is left of your token quota")
    assert "9,500 of 10,000 tokens used this month on the free tier" in chat
