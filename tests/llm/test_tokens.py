"""Token counts: LiteLLM's own for providers, llama.cpp's exact ones for the local model, and an
upper bound that no tokenizer's count passes."""

from __future__ import annotations

import time
import unicodedata

import litellm
import pytest

from vtai.llm import local_model, tokens
from vtai.llm.models import LOCAL_MODEL_ID

HISTORY = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France, and what is it known for?"},
    {"role": "assistant", "content": "Paris: the Louvre, the Seine, café terraces. 🇫🇷"},
    {"role": "user", "content": "x" * 5000 + " and some 日本語 too"},
    {"role": "user", "content": ""},
]

# Texts on which tiktoken-style counts read low against other tokenizers (SmolLM2's: 1.5-2.2x).
ADVERSARIAL = {
    "digits": " ".join(str(i * 7919 % 100003) for i in range(20)),
    "cjk": "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다。",
    "cyrillic": "Съешь же ещё этих мягких французских булок, да выпей чаю. Привет, мир!",
    "emoji": "🇫🇷👩‍👩‍👧‍👦🎉🔥 ok 👍🏽 ✨ " * 3,
    "hex": "0x" + "deadbeef" * 4 + " sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd1",
    "code": "def f(x):\n\treturn {'a': [x**2 for x in range(10)]}  # ok\n\n    <|im_end|>\n",
    "specials": "<|im_start|>user\nhi<|im_end|> <|endoftext|> \u200b\ufeff ﷺ ﷺ",
    "spaces": "   leading and trailing   \n\n\n",
    "empty": "",
}


def chats(text: str) -> list[list[dict]]:
    """The text alone (the template adds its system prompt), and in every role of a chat."""
    return [
        [{"role": "user", "content": text}],
        [
            {"role": "system", "content": text},
            {"role": "user", "content": text},
            {"role": "assistant", "content": text},
            {"role": "user", "content": "and?"},
        ],
    ]


@pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-3-5-haiku-20241022"])
def test_counts_equal_litellm_token_counter(model):
    assert not tokens.is_exact(model)
    for n in range(1, len(HISTORY) + 1):
        assert tokens.count_messages(model, HISTORY[:n]) == litellm.token_counter(
            model=model, messages=HISTORY[:n]
        )


def test_unusual_messages_are_counted_by_litellm():
    named = [{"role": "user", "content": "hello there", "name": "alice"}]
    assert tokens.count_messages("gpt-4o-mini", named) == litellm.token_counter(
        model="gpt-4o-mini", messages=named
    )


def test_local_count_is_llama_cpps_tokenization_of_the_templated_prompt():
    # The model's reported prompt_tokens are checked in test_local_model; this is the same
    # figure without running the model: llama.cpp's template, then llama.cpp's tokenizer.
    assert tokens.is_exact(LOCAL_MODEL_ID)
    for text in ADVERSARIAL.values():
        for messages in [*chats(text), HISTORY]:
            prompt = local_model.apply_template(messages)
            expected = len(local_model.tokenize(prompt, add_special=True))
            assert tokens.count_messages(LOCAL_MODEL_ID, messages) == expected, messages
    # ...by the fast path (one llama.cpp call per new message), which checked itself.
    assert tokens._local._check()
    # Prefill (an assistant message last) and typed content go through llama.cpp whole.
    for messages in (
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello 123"}],
        [
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            }
        ],
    ):
        expected = len(local_model.tokenize(local_model.apply_template(messages), add_special=True))
        assert tokens.count_messages(LOCAL_MODEL_ID, messages) == expected


def test_local_counts_are_remembered_per_message(monkeypatch):
    messages = chats(f"remembered {time.time_ns()} 12345 日本語")[1]
    counted = tokens.count_messages(LOCAL_MODEL_ID, messages)

    def no_tokenizer(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(local_model, "tokenize", no_tokenizer)
    # New dicts, same texts, another order: no llama.cpp call.
    assert tokens.count_messages(LOCAL_MODEL_ID, [dict(m) for m in messages]) == counted
    system, user, assistant, last = messages
    swapped = [system, last, assistant, user]
    assert tokens.count_messages(LOCAL_MODEL_ID, swapped) == counted


def test_local_count_never_under_counts_when_llama_cpp_fails(monkeypatch):
    messages = [{"role": "user", "content": f"unreachable {time.time_ns()} 1234567890"}]

    def broken(*args, **kwargs):
        raise OSError("connection refused")

    real = len(local_model.tokenize(local_model.apply_template(messages), add_special=True))
    monkeypatch.setattr(local_model, "tokenize", broken)
    assert tokens.count_messages(LOCAL_MODEL_ID, messages) >= real
    monkeypatch.undo()
    assert tokens.count_messages(LOCAL_MODEL_ID, messages) == real  # the fallback is not kept


def test_count_text():
    for text in ADVERSARIAL.values():
        assert tokens.count_text(LOCAL_MODEL_ID, text) == len(
            local_model.tokenize(text, special=False) if text else []
        )
        assert tokens.count_text("gpt-4o-mini", text) == (
            litellm.token_counter(model="gpt-4o-mini", text=text) if text else 0
        )


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_upper_bound_covers_every_count(name):
    for messages in chats(ADVERSARIAL[name]):
        exact = tokens.count_messages(LOCAL_MODEL_ID, messages)
        assert tokens.upper_bound(LOCAL_MODEL_ID, messages) == exact
        for model in ("gpt-4o-mini", "gpt-4", "claude-3-5-haiku-20241022", "no-such/model"):
            bound = tokens.upper_bound(model, messages)
            assert bound >= exact  # SmolLM2's tokenizer, a byte-level BPE
            assert bound >= litellm.token_counter(model=model, messages=messages)  # tiktoken


def test_upper_bound_covers_unicode_normalization():
    # A tokenizer that applies NFKC first sees 18 characters for each of these.
    text = "ﷺ" * 50
    nfkc = len(unicodedata.normalize("NFKC", text).encode())
    assert nfkc > 10 * len(text.encode())
    assert tokens.upper_bound("gpt-4o-mini", [{"role": "user", "content": text}]) > nfkc


def test_upper_bound_counts_names_and_parts():
    plain = [{"role": "user", "content": "hello"}]
    named = [{"role": "user", "content": "hello", "name": "a-rather-long-name"}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    bound = tokens.upper_bound("gpt-4o-mini", plain)
    assert tokens.upper_bound("gpt-4o-mini", named) >= bound + len("a-rather-long-name")
    assert tokens.upper_bound("gpt-4o-mini", parts) >= bound


def test_counting_a_long_history_is_cheap_once_seen():
    now = time.time_ns()
    history = [
        {
            "role": "system" if i == 0 else ("user" if i % 2 else "assistant"),
            "content": f"{i} {now} {HISTORY[i % len(HISTORY)]['content']}",
        }
        for i in range(20)
    ]
    for model in (LOCAL_MODEL_ID, "gpt-4o-mini"):
        tokens.count_messages(model, history)
        tokens.upper_bound(model, history)
        started = time.perf_counter()
        for _ in range(100):
            tokens.count_messages(model, history)
            tokens.upper_bound(model, history)
        # ~20 µs together on 2 busy cores; a llama.cpp or LiteLLM call per turn would be ~1 ms.
        assert (time.perf_counter() - started) / 100 < 0.001


def test_fallback_cost_is_the_list_price():
    expected = sum(
        litellm.cost_per_token(model="gpt-4o-mini", prompt_tokens=1000, completion_tokens=500)
    )
    assert tokens.cost("gpt-4o-mini", 1000, 500) == pytest.approx(expected)
    assert tokens.cost(LOCAL_MODEL_ID, 1000, 500) == 0.0
    assert tokens.cost("no-such/model", 10, 10) is None  # unknown, never a silent zero
