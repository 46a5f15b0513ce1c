"""LiteLLM builds a finished stream's response once, and everything it reports stays the same.

Real LiteLLM streams (its own mock_response) with usage in the stream, as every turn asks.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import litellm
import pytest
from litellm.integrations.custom_logger import CustomLogger
from litellm.litellm_core_utils import streaming_handler
from litellm.litellm_core_utils.logging_worker import GLOBAL_LOGGING_WORKER

from tests.conftest import add_user
from tests.metering.test_turn import collect, request, runner_for, wait_for_rows
from vtai.llm import stream_end

SHORT = "Paris, on the Seine."
# LiteLLM's mock streams 3 characters a chunk: this is well over INLINE_CHUNKS chunks.
LONG = " ".join(["word"] * 100)


class Builds:
    """Counts `litellm.stream_chunk_builder` runs, and notes which thread ran them."""

    def __init__(self, monkeypatch):
        self.threads: list[int] = []
        original = litellm.stream_chunk_builder

        def counted(*args, **kwargs):
            self.threads.append(threading.get_ident())
            return original(*args, **kwargs)

        monkeypatch.setattr(litellm, "stream_chunk_builder", counted)


class Seen(CustomLogger):
    """What LiteLLM's success hook receives."""

    def __init__(self):
        super().__init__()
        self.events: list[dict] = []

    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
        slo = kwargs["standard_logging_object"]
        self.events.append(
            {
                "content": response_obj.choices[0].message.content,
                "tokens": (slo["prompt_tokens"], slo["completion_tokens"]),
                "cost": slo["response_cost"],
            }
        )


@pytest.fixture
def patched():
    assert stream_end.apply(), stream_end.applicable()
    yield
    stream_end.remove()


@pytest.fixture
def unpatched():
    stream_end.remove()
    yield
    stream_end.apply()


@pytest.fixture
def seen():
    logger = Seen()
    litellm.callbacks.append(logger)
    yield logger
    litellm.logging_callback_manager.remove_callback_from_all_lists(logger)


async def stream_once(answer: str) -> tuple[str, dict]:
    """One streamed call, consumed to the end, its success hook run."""
    stream = await litellm.acompletion(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Where is Paris?"}],
        stream=True,
        stream_options={"include_usage": True},
        mock_response=answer,
    )
    parts, usage = [], {}
    async for chunk in stream:
        if getattr(chunk, "usage", None):
            usage = {
                "prompt": chunk.usage.prompt_tokens,
                "completion": chunk.usage.completion_tokens,
            }
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    await asyncio.sleep(0)
    await GLOBAL_LOGGING_WORKER.flush()
    return "".join(parts), usage


def test_applies_to_the_pinned_litellm():
    # Fails on a LiteLLM upgrade: then check whether the end of stream still builds twice,
    # and either move WRITTEN_FOR and CALL_SITE or delete the module.
    assert stream_end.applicable() is None


@pytest.mark.parametrize("answer", [SHORT, LONG], ids=["short", "long"])
async def test_unpatched_litellm_builds_twice(unpatched, monkeypatch, answer):
    builds = Builds(monkeypatch)
    await stream_once(answer)
    assert len(builds.threads) == 2


@pytest.mark.parametrize("answer", [SHORT, LONG], ids=["short", "long"])
async def test_builds_once_and_reports_the_same(unpatched, monkeypatch, seen, answer):
    before = await stream_once(answer)
    assert stream_end.apply()
    builds = Builds(monkeypatch)
    after = await stream_once(answer)
    assert len(builds.threads) == 1
    assert after == before and after[0] == answer and after[1]["completion"] > 0
    assert len(seen.events) == 2 and seen.events[0] == seen.events[1]
    assert seen.events[1]["content"] == answer
    # A short answer is built on the loop; a long one still in LiteLLM's worker thread.
    on_loop = builds.threads[0] == threading.get_ident()
    assert on_loop == (answer == SHORT)


async def test_each_call_builds_its_own_response(patched, seen):
    # Many streams at once: no call may get another call's build.
    answers = [f"answer number {i} " * (1 + i % 3) for i in range(12)]
    results = await asyncio.gather(*(stream_once(a) for a in answers))
    assert [text for text, _ in results] == answers
    assert sorted(e["content"] for e in seen.events) == sorted(answers)


def test_another_litellm_runs_unchanged(unpatched, monkeypatch, caplog):
    monkeypatch.setattr(stream_end, "version", lambda: "9.9.9")
    with caplog.at_level(logging.WARNING, logger="vtai.llm.stream_end"):
        assert stream_end.apply() is False
    assert streaming_handler.asyncify is not stream_end._build_once
    assert "LiteLLM is 9.9.9, the patch was written for 1.106.2" in caplog.text


def test_litellm_without_its_source_runs_unchanged(unpatched, monkeypatch):
    def no_source(_obj):
        raise OSError("could not get source code")

    monkeypatch.setattr(stream_end.inspect, "getsource", no_source)
    assert stream_end.apply() is False
    assert "source is not installed" in stream_end.applicable()


async def test_metered_turn_row_matches_its_usage(services, conn, monkeypatch):
    # Services.start applies the patch; the row the success hook writes is the turn's usage.
    builds = Builds(monkeypatch)
    user = await add_user(conn)
    runner = runner_for(services, mock_response=LONG)
    outcome, _ = await collect(runner, request(user))
    await services.flush()
    assert outcome.reply == LONG and len(builds.threads) == 1
    assert await wait_for_rows(conn, 1) == 1
    row = await conn.fetchrow(
        "select prompt_tokens, completion_tokens, additional_details from request_logs"
    )
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        outcome.usage["prompt_tokens"],
        outcome.usage["completion_tokens"],
    )
    assert "provisional" not in row["additional_details"]
