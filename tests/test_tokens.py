"""The turn's token counts equal LiteLLM's own, at a fraction of the cost."""

from __future__ import annotations

import litellm
import pytest

from vtai import tokens
from vtai.models import LOCAL_MODEL_ID

HISTORY = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France, and what is it known for?"},
    {"role": "assistant", "content": "Paris: the Louvre, the Seine, café terraces. 🇫🇷"},
    {"role": "user", "content": "x" * 5000 + " and some 日本語 too"},
    {"role": "user", "content": ""},
]


@pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-3-5-haiku-20241022", LOCAL_MODEL_ID])
def test_counts_equal_litellm_token_counter(model):
    for n in range(1, len(HISTORY) + 1):
        assert tokens.count_messages(model, HISTORY[:n]) == litellm.token_counter(
            model=model, messages=HISTORY[:n]
        )


def test_unusual_messages_are_counted_by_litellm():
    named = [{"role": "user", "content": "hello there", "name": "alice"}]
    assert tokens.count_messages("gpt-4o-mini", named) == litellm.token_counter(
        model="gpt-4o-mini", messages=named
    )


def test_fallback_cost_is_the_list_price():
    expected = sum(
        litellm.cost_per_token(model="gpt-4o-mini", prompt_tokens=1000, completion_tokens=500)
    )
    assert tokens.cost("gpt-4o-mini", 1000, 500) == pytest.approx(expected)
    assert tokens.cost(LOCAL_MODEL_ID, 1000, 500) == 0.0
    assert tokens.cost("no-such/model", 10, 10) == 0.0
