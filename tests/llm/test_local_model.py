"""The offline model through LiteLLM, on the real SmolLM2 weights (no mocks)."""

import asyncio
import threading
import time
import uuid

import httpx
import litellm
import pytest
from litellm.integrations.custom_logger import CustomLogger

from tests.llm.test_tokens import ADVERSARIAL
from vtai.llm import local_model, tokens
from vtai.llm.local_model import CONTEXT_WINDOW, LOCAL_MODEL

MESSAGES = [{"role": "user", "content": "Write a short poem about the sea."}]
# A hung generation must fail the test, not the whole run.
DEADLINE = 30


@pytest.fixture(autouse=True)
def registered():
    local_model.register()
    local_model.server()  # so no test's timing includes loading the model


async def stream(**kwargs) -> tuple[list[str], object, str]:
    """Texts of the content chunks, the last chunk's usage and the response id."""
    response = await litellm.acompletion(
        model=LOCAL_MODEL,
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        **kwargs,
    )
    texts, last = [], None
    async for chunk in response:
        if chunk.choices and chunk.choices[0].delta.content:
            texts.append(chunk.choices[0].delta.content)
        last = chunk
    return texts, getattr(last, "usage", None), last.id


# Generous on purpose: these check that nothing hangs, not how fast; CI shares 2 cores.
async def wait_until(condition, seconds: float = 60) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def test_model_ships_in_a_package():
    path = local_model.model_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000


def test_register_is_idempotent():
    local_model.register()
    local_model.register()
    providers = [item["provider"] for item in litellm.custom_provider_map]
    assert providers.count("local") == 1
    assert "local" in litellm._custom_providers


async def test_streaming_yields_chunks_then_exact_usage():
    texts, usage, _ = await asyncio.wait_for(stream(max_tokens=16), DEADLINE)
    assert len(texts) >= 3
    assert usage.prompt_tokens > 0
    assert 0 < usage.completion_tokens <= 16
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_non_streaming_usage_matches_streaming():
    response = await litellm.acompletion(model=LOCAL_MODEL, messages=MESSAGES, max_tokens=8)
    usage = response.usage
    assert response.choices[0].message.content
    assert 0 < usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # Same messages, same template: llama.cpp counts the same prompt either way.
    _, streamed, _ = await stream(max_tokens=1)
    assert streamed.prompt_tokens == usage.prompt_tokens


async def test_max_completion_tokens_and_stop_are_honoured():
    capped = await litellm.acompletion(
        model=LOCAL_MODEL, messages=MESSAGES, max_completion_tokens=3, temperature=0
    )
    assert capped.usage.completion_tokens <= 3
    full = await litellm.acompletion(
        model=LOCAL_MODEL, messages=MESSAGES, max_tokens=12, temperature=0
    )
    text = full.choices[0].message.content
    word = text.split()[2]
    stopped = await litellm.acompletion(
        model=LOCAL_MODEL, messages=MESSAGES, max_tokens=12, temperature=0, stop=[word]
    )
    assert word not in stopped.choices[0].message.content
    assert stopped.usage.completion_tokens < full.usage.completion_tokens


class Recorder(CustomLogger):
    def __init__(self):
        super().__init__()
        self.logged: list[dict] = []

    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
        self.logged.append(kwargs["standard_logging_object"])


# LiteLLM keeps the first logger of a class it sees and never lets go of it (removing it from
# litellm.callbacks is not enough), so one instance serves every test.
RECORDER = Recorder()


@pytest.mark.parametrize("streaming", [True, False], ids=["stream", "no-stream"])
async def test_success_callback_sees_exact_usage_and_zero_cost(streaming):
    if RECORDER not in litellm.callbacks:
        litellm.callbacks.append(RECORDER)
    if streaming:
        _, usage, response_id = await stream(max_tokens=8)
    else:
        response = await litellm.acompletion(model=LOCAL_MODEL, messages=MESSAGES, max_tokens=8)
        usage, response_id = response.usage, response.id

    def logged():
        # Earlier tests' calls may still be arriving.
        return [entry for entry in RECORDER.logged if entry["id"] == response_id]

    # LiteLLM runs success callbacks in a background worker.
    assert await wait_until(logged)
    [entry] = logged()
    assert entry["prompt_tokens"] == usage.prompt_tokens
    assert entry["completion_tokens"] == usage.completion_tokens
    assert entry["total_tokens"] == usage.total_tokens
    assert entry["response_cost"] == 0


async def test_model_loads_once():
    first = local_model.server()
    await litellm.acompletion(model=LOCAL_MODEL, messages=MESSAGES, max_tokens=2)
    await stream(max_tokens=2)
    assert local_model.server() is first


def test_llama_cpp_http_port_needs_a_key():
    # xllamacpp always opens one; nothing in the app uses it, nobody else should either.
    address = local_model.server().listening_address
    assert address.startswith("http://127.0.0.1:")
    response = httpx.post(
        f"{address}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    )
    assert response.status_code == 401


async def test_generation_does_not_block_the_event_loop():
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        await litellm.acompletion(model=LOCAL_MODEL, messages=MESSAGES, max_tokens=48)
    finally:
        task.cancel()
    assert ticks >= 10


async def test_closing_a_stream_midway_stops_generation():
    response = await litellm.acompletion(
        model=LOCAL_MODEL, messages=MESSAGES, stream=True, max_tokens=1000
    )
    seen = 0
    async for _ in response:
        seen += 1
        if seen == 2:
            break
    await response.aclose()
    assert await wait_until(lambda: local_model.active_generations() == 0)
    texts, usage, _ = await asyncio.wait_for(stream(max_tokens=4), DEADLINE)
    assert texts and usage.completion_tokens <= 4


async def test_breaking_out_without_closing_does_not_hang():
    async def consume_two():
        response = await litellm.acompletion(
            model=LOCAL_MODEL, messages=MESSAGES, stream=True, max_tokens=1000
        )
        seen = 0
        async for _ in response:
            seen += 1
            if seen == 2:
                break

    await asyncio.wait_for(consume_two(), DEADLINE)
    # The abandoned stream is closed when it is garbage collected, which stops llama.cpp.
    assert await wait_until(lambda: local_model.active_generations() == 0)
    _, usage, _ = await asyncio.wait_for(stream(max_tokens=4), DEADLINE)
    assert usage.completion_tokens <= 4


async def test_cancelling_the_consumer_task_stops_generation():
    # A long answer, cancelled as soon as it starts: a short one could end on its own first.
    counting = [{"role": "user", "content": "Count from 1 to 1000, one number per line."}]

    async def consume_all():
        response = await litellm.acompletion(
            model=LOCAL_MODEL, messages=counting, stream=True, max_tokens=1000
        )
        async for _ in response:
            pass

    task = asyncio.create_task(consume_all())
    assert await wait_until(lambda: local_model.active_generations() > 0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await wait_until(lambda: local_model.active_generations() == 0)


@pytest.mark.parametrize("streaming", [True, False], ids=["stream", "no-stream"])
async def test_prompt_longer_than_context_fails_fast(streaming):
    messages = [{"role": "user", "content": "hello world " * CONTEXT_WINDOW}]
    started = time.monotonic()
    with pytest.raises(litellm.ContextWindowExceededError, match="context size"):
        response = await litellm.acompletion(
            model=LOCAL_MODEL, messages=messages, max_tokens=4, stream=streaming
        )
        if streaming:
            async for _ in response:
                pass
    # Reading the whole prompt would take half a minute.
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("streaming", [True, False], ids=["stream", "no-stream"])
async def test_timeout_raises_litellm_timeout(streaming):
    # A new prompt (no prompt cache) of ~160 tokens takes over a second to read.
    text = f"Stream {streaming}: " + "the cat sat on the mat, " * 25
    started = time.monotonic()
    with pytest.raises(litellm.Timeout):
        response = await litellm.acompletion(
            model=LOCAL_MODEL,
            messages=[{"role": "user", "content": text}],
            max_tokens=200,
            stream=streaming,
            timeout=0.05,
        )
        if streaming:
            async for _ in response:
                pass
    assert time.monotonic() - started < 30
    assert await wait_until(lambda: local_model.active_generations() == 0)


def test_sync_completion_and_streaming():
    response = litellm.completion(model=LOCAL_MODEL, messages=MESSAGES, max_tokens=4)
    assert 0 < response.usage.completion_tokens <= 4
    chunks = list(
        litellm.completion(
            model=LOCAL_MODEL,
            messages=MESSAGES,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.completion_tokens == response.usage.completion_tokens


async def usage_and_stats(messages, user=None, max_tokens=1):
    """The model's reported usage, and what llama.cpp said about the prompt's cache."""
    call_id = str(uuid.uuid4())
    extra = {"metadata": {"vtai": {"user_id": user}}} if user else {}
    response = await asyncio.wait_for(
        litellm.acompletion(
            model=LOCAL_MODEL,
            messages=messages,
            max_tokens=max_tokens,
            temperature=0,
            litellm_call_id=call_id,
            **extra,
        ),
        DEADLINE,
    )
    return response, local_model.prompt_stats(call_id)


async def test_exact_count_equals_reported_prompt_tokens():
    # Every adversarial text, in two calls: one chat with them in every role, one without a
    # system message (the template adds its own) of special-token look-alikes.
    texts = [t for name, t in ADVERSARIAL.items() if name not in ("specials", "cyrillic")]
    conversations = [
        [
            {"role": "system", "content": ADVERSARIAL["cyrillic"]},
            *(
                {"role": "user" if i % 2 == 0 else "assistant", "content": text}
                for i, text in enumerate(texts)
            ),
        ],
        [{"role": "user", "content": ADVERSARIAL["specials"] + ADVERSARIAL["code"]}],
    ]
    assert conversations[0][-1]["role"] == "user"
    for messages in conversations:
        counted = tokens.count_messages(LOCAL_MODEL, messages)
        response, _ = await usage_and_stats(messages)
        assert counted == response.usage.prompt_tokens
        assert tokens.upper_bound(LOCAL_MODEL, messages) == counted
        # What the bound promises for other providers holds on this tokenizer too.
        assert tokens.upper_bound("gpt-4o-mini", messages) >= counted
        # ...and LiteLLM's count would have read low: the bug this fixes.
        assert litellm.token_counter(model=LOCAL_MODEL, messages=messages) < counted


def new_text(tag: str) -> str:
    """~100 tokens no earlier request has sent."""
    return f"{tag} {uuid.uuid4()}: " + " ".join(f"row {i} holds {i * 37 % 1000}" for i in range(8))


async def test_prompt_cache_not_shared_across_users():
    user_a, user_b, user_c = (f"user-{uuid.uuid4()}" for _ in range(3))
    messages = [{"role": "user", "content": new_text("secret")}]
    first, stats_a = await usage_and_stats(messages, user=user_a)
    # B sends exactly what A just sent: another slot, and no reuse of anything.
    same, stats_b = await usage_and_stats(messages, user=user_b)
    # C too: the least recently used slot is now A's, which holds that very prompt.
    again, stats_c = await usage_and_stats(messages, user=user_c)
    assert stats_c["slot"] == stats_a["slot"]
    for response, stats in ((same, stats_b), (again, stats_c)):
        assert response.usage.prompt_tokens == first.usage.prompt_tokens
        assert not stats["reused"]
        assert stats["cached"] == 0
        assert stats["processed"] == response.usage.prompt_tokens  # the whole prompt


async def test_users_own_followup_reuses_cache():
    user = f"user-{uuid.uuid4()}"
    messages = [{"role": "user", "content": new_text("mine")}]
    first, stats = await usage_and_stats(messages, user=user, max_tokens=4)
    assert stats["cached"] == 0
    reply = first.choices[0].message.content
    followup = [
        *messages,
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "Why?"},
    ]
    second, stats = await usage_and_stats(followup, user=user)
    assert stats["reused"]
    # Everything up to the reply comes from the cache; only the new message is read.
    assert stats["cached"] >= first.usage.prompt_tokens
    assert stats["processed"] == second.usage.prompt_tokens - stats["cached"]
    assert stats["processed"] < 20


async def test_requests_without_a_user_reuse_nothing():
    messages = [{"role": "user", "content": new_text("anonymous")}]
    await usage_and_stats(messages)
    response, stats = await usage_and_stats(messages)
    assert not stats["reused"] and stats["cached"] == 0
    assert stats["processed"] == response.usage.prompt_tokens


def test_slots_go_to_their_owner_or_change_hands():
    slots = local_model._Slots(2)
    stop = threading.Event()
    assert slots.acquire("a", stop) == (0, False)
    assert slots.acquire("b", stop) == (1, False)
    slots.release(0)
    slots.release(1)
    assert slots.acquire("b", stop) == (1, True)  # its own, though 0 is older
    assert slots.acquire("c", stop) == (0, False)  # a's: a new owner, no reuse
    slots.release(0)
    assert slots.acquire("a", stop) == (0, False)  # c had it last
    slots.release(0)
    assert slots.acquire(None, stop) == (0, False)  # nobody reuses an anonymous prompt
    slots.release(0)
    assert slots.acquire(None, stop) == (0, False)
    # Both busy: it waits, and gives up when its consumer stops.
    got = []
    waiter = threading.Thread(target=lambda: got.append(slots.acquire("b", stop)))
    waiter.start()
    time.sleep(0.2)
    assert not got
    slots.release(1)
    waiter.join(5)
    assert got == [(1, True)]
    stop.set()
    assert slots.acquire("d", stop) is None
