"""Provider failures through LiteLLM's real HTTP path, against a FAKE provider (see
tests/fake_provider.py): one clear line for the user, a failure row, no charge; what every
path costs; the retry policy and its deadline."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiohttp import web

from tests.conftest import add_user, make_settings, offering
from tests.fake_provider import ANSWER, FakeProvider, _chunk
from tests.metering.test_turn import collect, wait_for_rows
from vtai.llm import tokens
from vtai.metering import turn as turn_module
from vtai.metering.turn import TurnRequest, TurnRunner
from vtai.services import Services

MODEL = "openai/fake"
PRICED = "openai/gpt-4o-mini"  # in LiteLLM's price map
CACHED_USAGE = {
    "prompt_tokens": 1200,
    "completion_tokens": len(ANSWER.split(" ")),
    "total_tokens": 1200 + len(ANSWER.split(" ")),
    "prompt_tokens_details": {"cached_tokens": 1024},
    "completion_tokens_details": {"reasoning_tokens": 3},
}


async def _more(request: web.Request) -> web.StreamResponse:
    """Two more FAKE behaviours: `cached` reports usage with cached prompt tokens and reasoning
    tokens, as OpenAI does; `stall` sends five words and then nothing."""
    mode = request.match_info["mode"]
    request.app["calls"].append(mode)
    request.app["bodies"].append(await request.json())
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i, word in enumerate(ANSWER.split(" ")):
        await response.write(_chunk(word if i == 0 else " " + word))
        if mode == "stall" and i == 4:
            await asyncio.sleep(3600)
    await response.write(_chunk(finish="stop"))
    await response.write(_chunk(usage=CACHED_USAGE))
    await response.write(b"data: [DONE]\n\n")
    return response


class Provider(FakeProvider):
    def build_app(self) -> web.Application:
        app = super().build_app()
        app.router.add_post("/more/{mode}/chat/completions", _more)
        return app


@pytest.fixture(scope="module")
def provider():
    p = Provider().start()
    yield p
    p.stop()


@pytest.fixture
async def svc(db_url, tmp_path):
    s = await Services.start(make_settings(db_url, tmp_path, request_timeout=2.0), replay=False)
    yield s
    await s.stop()


def runner(svc, provider, mode, model=MODEL):
    # No retry options of the test's own: the turn's retry policy is what runs.
    return TurnRunner(
        svc.gate,
        svc.ledger,
        svc.callback.notes,
        offering(svc.settings, model),
        call_options={"api_base": provider.url(mode), "api_key": "sk-test-not-a-real-key"},
    )


async def turn(svc, provider, conn, mode, model=MODEL):
    user = await add_user(conn)
    outcome, tokens = await collect(
        runner(svc, provider, mode, model), TurnRequest(user.id, "chat", model, [], "Hello?")
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


async def test_timeout_is_charged_the_prompt_it_sent(svc, provider, conn):
    """A provider that took the request and never answered may still bill the prompt it
    processed: the turn is charged it, estimated, as a stopped one is."""
    outcome, tokens, row, counter = await turn(svc, provider, conn, "hang")
    assert outcome.kind == "failed" and not tokens
    assert "did not answer within 2 s" in outcome.notice and "\n" not in outcome.notice
    assert row["status"] == "failure" and json.loads(row["error"])["class"] == "Timeout"
    assert row["prompt_tokens"] > 0 and row["completion_tokens"] == 0
    assert json.loads(row["additional_details"])["estimated"] is True
    assert (counter["used"], counter["reserved"]) == (row["total_tokens"], 0)


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


# --- What each path costs ---------------------------------------------------------------------


def cost_of(row) -> float | None:
    details = json.loads(row["additional_details"])
    if details.get("cost_unknown"):
        return None
    return float(row["total_cost"])


def list_price(row, model=PRICED) -> float:
    return tokens.cost(
        model,
        row["prompt_tokens"],
        row["completion_tokens"],
        row["cached_tokens"],
        row["reasoning_tokens"],
    )


@pytest.mark.parametrize("mode", ["break", "more/stall"])
async def test_broken_and_stalled_streams_carry_their_list_price(svc, provider, conn, mode):
    outcome, tokens_seen, row, counter = await turn(svc, provider, conn, mode, PRICED)
    assert outcome.kind == "failed" and tokens_seen
    assert row["status"] == "failure" and row["provider"] == "openai"
    assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0
    assert cost_of(row) == pytest.approx(list_price(row)) and cost_of(row) > 0
    assert counter["used"] == row["total_tokens"]


async def test_a_stopped_stream_carries_its_list_price(svc, provider, conn):
    user = await add_user(conn)
    seen = []

    async def on_token(t):
        seen.append(t)
        if len(seen) == 5:
            raise asyncio.CancelledError  # what Chainlit's stop does to the task

    with pytest.raises(asyncio.CancelledError):
        await runner(svc, provider, "slow", PRICED).run(
            TurnRequest(user.id, "chat", PRICED, [], "Hello?"), on_token
        )
    await wait_for_rows(conn, 1)
    row = await conn.fetchrow("select * from request_logs")
    assert json.loads(row["additional_details"])["aborted"] is True
    assert row["provider"] == "openai" and row["completion_tokens"] >= 5
    assert cost_of(row) == pytest.approx(list_price(row)) and cost_of(row) > 0


@pytest.mark.parametrize("mode", ["ok", "break"])
async def test_a_model_without_a_price_is_recorded_as_cost_unknown(svc, provider, conn, mode):
    _, _, row, _ = await turn(svc, provider, conn, mode)
    assert row["total_tokens"] > 0
    assert json.loads(row["additional_details"])["cost_unknown"] is True
    assert cost_of(row) is None


async def test_cached_and_reasoning_tokens_are_columns_and_priced_on_every_path(
    svc, provider, conn
):
    outcome, _, row, _ = await turn(svc, provider, conn, "more/cached", PRICED)
    assert outcome.kind == "answered"
    assert (row["prompt_tokens"], row["cached_tokens"], row["reasoning_tokens"]) == (1200, 1024, 3)
    details = json.loads(row["additional_details"])
    assert "cached_tokens" not in details and "provisional" not in details
    # Priced as LiteLLM prices the usage (cached tokens at their rate); the columns re-derive it.
    assert cost_of(row) == pytest.approx(list_price(row))
    assert cost_of(row) < tokens.cost(PRICED, 1200, row["completion_tokens"])


async def test_the_row_replayed_after_a_crash_keeps_the_cached_discount(svc, provider, conn):
    """The provisional row, held on disk at the answer, is what start-up replays if the process
    dies before LiteLLM's hook: it must cost what the full row costs."""
    held = []
    hold = svc.ledger.hold

    def keep(row):
        held.append(row)
        return hold(row)

    svc.ledger.hold = keep
    outcome, _, row, _ = await turn(svc, provider, conn, "more/cached", PRICED)
    (provisional,) = [r for r in held if r["additional_details"].get("provisional")]
    assert provisional["prompt_tokens"] == 1200
    assert provisional["additional_details"]["cached_tokens"] == 1024
    assert provisional["total_cost"] == pytest.approx(cost_of(row))


@pytest.mark.parametrize("mode", ["500", "429", "401", "hang"])
async def test_a_failure_before_the_first_token_is_one_write(svc, provider, conn, mode):
    writes: list[str] = []
    send = svc.ledger.store.record_encoded

    async def counting(texts):
        writes.extend(json.loads(t)["litellm_call_id"] for t in texts)
        return await send(texts)

    svc.ledger.store.record_encoded = counting
    outcome, _, _, _ = await turn(svc, provider, conn, mode)
    await svc.flush()  # LiteLLM's failure hooks, one per attempt, have run
    assert writes == [outcome.call_id]


# --- Retries and the deadline (svc: VTAI_REQUEST_TIMEOUT=2) ----------------------------------


@pytest.mark.parametrize(
    ("mode", "requests", "at_most"),
    [
        ("500", 1 + turn_module.RETRIES, 1.5),  # a server error: retried once, 0.5 s later
        ("429", 1, 0.5),  # a rate limit: not retried
        ("401", 1, 0.5),  # a refused request: not retried
        ("hang", 1, 2.6),  # no answer: the deadline, once
    ],
)
async def test_one_retry_policy_within_the_deadline(svc, provider, conn, mode, requests, at_most):
    before = len(provider.calls)
    started = time.monotonic()
    outcome, _, row, _ = await turn(svc, provider, conn, mode)
    elapsed = time.monotonic() - started
    assert outcome.kind == "failed" and row["status"] == "failure"
    assert len(provider.calls) - before == requests
    assert elapsed < at_most, elapsed
    if mode == "hang":
        assert elapsed >= 2.0 and "did not answer within 2 s" in outcome.notice


async def test_no_retry_that_would_end_past_the_deadline(svc, provider, conn, monkeypatch):
    monkeypatch.setattr(turn_module, "RETRY_DELAY", 5.0)
    before = len(provider.calls)
    outcome, _, _, _ = await turn(svc, provider, conn, "500")
    assert outcome.kind == "failed" and len(provider.calls) - before == 1
