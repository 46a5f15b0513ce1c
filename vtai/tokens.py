"""Token counts and prices on the turn's path, without LiteLLM's per-call overhead.

`litellm.token_counter` spends 0.1-0.3 ms per call, mostly outside the tokenizer, and a chat
counts its whole history on every turn, more than once when it has to be trimmed. Here each
message's content is counted once, by token_counter itself, and remembered; the framing is
added the way token_counter adds it, so the totals are the same.
"""

from __future__ import annotations

import functools

import litellm

# token_counter's framing: per message, and once for the reply's priming.
PER_MESSAGE = 4
PRIMING = 3


@functools.lru_cache(maxsize=8192)
def _content_tokens(model: str, content: str) -> int:
    return litellm.token_counter(model=model, text=content)


def _message_tokens(model: str, message: dict) -> int:
    content = message.get("content")
    if isinstance(content, str) and message.keys() <= {"role", "content"}:
        return _content_tokens(model, content) + PER_MESSAGE
    # Names, tool calls, images: LiteLLM knows the rules.
    return litellm.token_counter(model=model, messages=[message]) - PRIMING


def count_messages(model: str, messages: list[dict]) -> int:
    """What `litellm.token_counter(model=model, messages=messages)` returns."""
    return sum(_message_tokens(model, m) for m in messages) + PRIMING


@functools.lru_cache(maxsize=256)
def _prices(model: str) -> tuple[float, float]:
    try:
        per_prompt = litellm.cost_per_token(model=model, prompt_tokens=1, completion_tokens=0)
        per_completion = litellm.cost_per_token(model=model, prompt_tokens=0, completion_tokens=1)
    except Exception:
        return 0.0, 0.0
    return per_prompt[0], per_completion[1]


def cost(model: str, prompt_tokens: int, completion_tokens: int) -> float:
    """Linear list price; a fallback only, where LiteLLM's own response cost is not at hand."""
    per_prompt, per_completion = _prices(model)
    return per_prompt * prompt_tokens + per_completion * completion_tokens
