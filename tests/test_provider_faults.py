"""Provider failures through LiteLLM's real HTTP path, against a FAKE provider (see
tests/fake_provider.py): one clear line for the user, a failure row, no charge."""

from __future__ import annotations

import json

import pytest

from tests.conftest import add_user, make_settings, offering
from tests.fake_provider import FakeProvider
from tests.test_turn import collect, wait_for_rows
from vtai.services import Services
from vtai.turn import TurnRequest, TurnRunner

MODEL = "openai/fake"


@pytest.fixture(scope="module")
def provider():
    p = FakeProvider().start()
    yield p
    p.stop()


@pytest.fixture
async def svc(db_url, tmp_path):
    s = await Services.start(make_settings(db_url, tmp_path, request_timeout=2.0), replay=False)
    yield s
    await s.stop()


def runner(svc, provider, mode):
    return TurnRunner(
        svc.gate,
        svc.ledger,
        svc.callback.notes,
        offering(svc.settings, MODEL),
        call_options={
            "api_base": provider.url(mode),
            "api_key": "sk-test-not-a-real-key",
            "max_retries": 0,
        },
    )


async def turn(svc, provider, conn, mode):
    user = await add_user(conn)
    outcome, tokens = await collect(
        runner(svc, provider, mode), TurnRequest(user.id, "chat", MODEL, [], "Hello?")
    )
    await wait_for_rows(conn, 1)
    await svc.runner.drain()
    row = await conn.fetchrow("select * from request_logs where end_user = $1", user.id)
    counter = await conn.fetchrow(
        "select used, reserved from usage_counters where end_user = $1", user.id
    )
    return outcome, tokens, row, counter


@pytest.mark.parametrize(
    ("mode", "error_class", "says"),
    [
        ("401", "AuthenticationError", "rejected the API key"),
        ("429", "RateLimitError", "rate-limiting"),
        ("500", "InternalServerError", "server error"),
        ("hang", "Timeout", "did not answer within 2 s"),
        ("ctx", "ContextWindowExceededError", "too long"),
        ("404", "NotFoundError", "not available"),
    ],
)
async def test_failure_is_one_line_logged_and_free(svc, provider, conn, mode, error_class, says):
    outcome, tokens, row, counter = await turn(svc, provider, conn, mode)
    assert outcome.kind == "failed" and not tokens
    assert says in outcome.notice and "\n" not in outcome.notice
    assert "sk-" not in outcome.notice
    assert row["status"] == "failure" and row["total_tokens"] == 0
    assert json.loads(row["error"])["class"] == error_class
    assert (counter["used"], counter["reserved"]) == (0, 0)
    assert await conn.fetchval("select count(*) from request_logs") == 1


async def test_stream_that_breaks_midway_charges_what_was_produced(svc, provider, conn):
    outcome, tokens, row, counter = await turn(svc, provider, conn, "break")
    assert outcome.kind == "failed" and tokens and "cut off" in outcome.notice
    assert row["status"] == "failure" and row["completion_tokens"] > 0
    assert json.loads(row["additional_details"])["estimated"] is True
    assert counter["used"] == row["total_tokens"] and counter["reserved"] == 0


async def test_missing_usage_is_estimated_and_flagged(svc, provider, conn):
    outcome, tokens, row, counter = await turn(svc, provider, conn, "no-usage")
    assert outcome.kind == "answered"
    assert row["status"] == "success" and row["completion_tokens"] > 0
    assert row["prompt_tokens"] > 0
    assert json.loads(row["additional_details"])["estimated"] is True
    assert counter["used"] == row["total_tokens"] and counter["reserved"] == 0


async def test_normal_answer_uses_provider_usage(svc, provider, conn):
    outcome, tokens, row, counter = await turn(svc, provider, conn, "ok")
    assert outcome.kind == "answered" and len(tokens) > 3
    assert (row["prompt_tokens"], row["status"]) == (11, "success")
    assert json.loads(row["additional_details"])["estimated"] is False
