"""Token counts and prices on the turn's path, without LiteLLM's per-call overhead.

Three counts, each remembered per message content, since a chat counts its whole history on
every turn:

- `count_messages`: for the local model, the exact prompt tokens llama.cpp processes (its chat
  template, its default system prompt, its tokenizer), equal to the `prompt_tokens` it reports.
  For other models, what `litellm.token_counter` returns (tiktoken for OpenAI models), an
  estimate: providers tokenize their own way, and text with digits, CJK, Cyrillic or hex can
  cost twice what tiktoken counts.
- `upper_bound`: a count no BPE tokenizer's can exceed for the same prompt (see below).
- `count_text`: one text's tokens, for completions (exact for the local model).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import threading
import unicodedata

import litellm

from vtai.llm.models import LOCAL_MODEL_ID, catalogue_price

log = logging.getLogger(__name__)

# token_counter's framing: per message, and once for the reply's priming.
PER_MESSAGE = 4
PRIMING = 3

# upper_bound's allowances, in tokens. Content is bounded by its UTF-8 bytes: every token of a
# BPE tokenizer covers at least one byte of the text it was given (byte-level BPE such as
# tiktoken's merges bytes; SentencePiece with byte fallback emits one token per byte at worst),
# so a text of n bytes is at most n tokens. Two things add tokens the bytes don't show, and the
# allowances cover them generously:
# - framing: the special tokens that open and close each message and name its role (chat
#   templates use 3-6, e.g. ChatML's <|im_start|>role\n ... <|im_end|>\n is 5 with the role),
#   plus the one dummy-prefix token SentencePiece may add per text fragment. The role's own
#   bytes are added on top.
BOUND_PER_MESSAGE = 16
# - the reply's priming (<|im_start|>assistant\n and the like).
BOUND_PRIMING = 16
# - a system prompt the template injects when the chat has none (SmolLM2's is 24 tokens,
#   Llama 3's date header about 25, Qwen's about 20): five times the largest we know.
BOUND_DEFAULT_SYSTEM = 128
# Tokenizers that normalize Unicode first (NFC/NFKC) tokenize a text whose bytes can exceed the
# original's (NFKC turns U+FDFA, 3 bytes, into 33), so non-ASCII text is measured in its
# decomposed forms too and the largest is used.


def is_exact(model: str) -> bool:
    """Whether count_messages and count_text are the model's own counts (the local model)."""
    return model == LOCAL_MODEL_ID


@functools.lru_cache(maxsize=256)
def _counting_model(model: str) -> str | None:
    """The model name LiteLLM should count with: OpenAI's own (tiktoken, shipped with
    LiteLLM), else none, which counts with cl100k. Given a Llama or Cohere name, LiteLLM would
    fetch a tokenizer from Hugging Face on the event loop: a network call per new text, and
    about 23 s of retries each time where the network is closed."""
    try:
        provider = litellm.get_llm_provider(model)[1]
    except Exception:
        return None
    return model if provider in ("openai", "azure", "text-completion-openai") else None


@functools.lru_cache(maxsize=8192)
def _content_tokens(model: str, content: str) -> int:
    return litellm.token_counter(model=_counting_model(model), text=content)


def _message_tokens(model: str, message: dict) -> int:
    content = message.get("content")
    if isinstance(content, str) and message.keys() <= {"role", "content"}:
        return _content_tokens(model, content) + PER_MESSAGE
    # Names, tool calls, images: LiteLLM knows the rules.
    return litellm.token_counter(model=_counting_model(model), messages=[message]) - PRIMING


def count_messages(model: str, messages: list[dict]) -> int:
    """Prompt tokens: exact for the local model, else `litellm.token_counter`'s count."""
    if is_exact(model):
        return _local.count(messages)
    return sum(_message_tokens(model, m) for m in messages) + PRIMING


def count_text(model: str, text: str) -> int:
    """Tokens of one text (a completion): llama.cpp's tokenizer for the local model, else
    LiteLLM's (tiktoken for OpenAI models, cl100k for models it has no tokenizer for)."""
    if not text:
        return 0
    if is_exact(model):
        return _local.text(text)
    return _content_tokens(model, text)


def upper_bound(model: str, messages: list[dict]) -> int:
    """Prompt tokens no provider's BPE tokenizer can exceed for these messages: UTF-8 bytes of
    each content plus BOUND_* allowances. The local model's exact count is its own bound."""
    if is_exact(model):
        return _local.count(messages)
    total = BOUND_DEFAULT_SYSTEM + BOUND_PRIMING
    for message in messages:
        total += _message_bound(message)
    return total


def _message_bound(message: dict) -> int:
    content = message.get("content")
    role = message.get("role")
    total = BOUND_PER_MESSAGE + (_text_bytes(role) if isinstance(role, str) else 0)
    if isinstance(content, str):
        total += _text_bytes(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                total += _text_bytes(part["text"]) + BOUND_PER_MESSAGE
            else:
                # An image or file is billed by its own rules, not its bytes: LiteLLM's count
                # of the part, doubled. Not a proven bound (the app sends no such parts).
                total += 2 * litellm.token_counter(messages=[{"role": "user", "content": [part]}])
    elif content is not None:
        total += _text_bytes(json.dumps(content, default=str))
    # Names, tool calls and the like are text the template renders too.
    extra = {k: v for k, v in message.items() if k not in ("role", "content") and v is not None}
    if extra:
        total += _text_bytes(json.dumps(extra, default=str, ensure_ascii=False))
    return total


@functools.lru_cache(maxsize=8192)
def _text_bytes(text: str) -> int:
    if text.isascii():
        return len(text)
    return max(
        len(form.encode("utf-8", "surrogatepass"))
        for form in (text, unicodedata.normalize("NFD", text), unicodedata.normalize("NFKD", text))
    )


class _LocalCounter:
    """The local model's prompt, counted as llama.cpp builds and tokenizes it.

    llama.cpp renders the chat with the model's template (ChatML for SmolLM2: each message is
    `<|im_start|>{role}\\n{content}<|im_end|>\\n`, a default system message first when the chat
    has none, `<|im_start|>assistant\\n` last) and tokenizes the result with special tokens
    parsed. Its tokenizer splits the text at special tokens first and tokenizes each piece on
    its own, so a message, which begins and ends with one, has the same tokens wherever it
    stands: each is tokenized once and remembered. At first use the rendering is checked
    against llama.cpp's own (/apply-template); if it differs (another model or template), and
    for messages it does not cover, the whole prompt is rendered and tokenized by llama.cpp.
    """

    START = "<|im_start|>"
    END = "<|im_end|>"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._checked: bool | None = None  # None: not yet; False: render by llama.cpp
        self._system = 0  # tokens of the default system message
        self._priming = 0  # tokens of the generation prompt
        self._start_id = -1  # the token START becomes
        self._messages: dict[tuple[str, str], int] = {}  # (role, content) -> tokens

    def _model(self):
        from vtai.llm import local_model  # loads llama.cpp; only the local model needs it

        return local_model

    def _render(self, role: str, content: str) -> str:
        return f"{self.START}{role}\n{content}{self.END}\n"

    def _check(self) -> bool:
        if self._checked is not None:
            return self._checked
        with self._lock:
            if self._checked is None:
                self._checked = self._matches()
            return self._checked

    def _matches(self) -> bool:
        lm = self._model()
        probe = [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
        ]
        with_system = [{"role": "system", "content": "s"}, *probe]
        bare = lm.apply_template(with_system)
        expected = "".join(self._render(m["role"], m["content"]) for m in with_system)
        priming = f"{self.START}assistant\n"
        if bare != expected + priming:
            log.warning("local model: unexpected chat template, counting whole prompts")
            return False
        prompt = lm.apply_template(probe)
        rendered = "".join(self._render(m["role"], m["content"]) for m in probe) + priming
        if not prompt.endswith(rendered) or not prompt.startswith(f"{self.START}system\n"):
            log.warning("local model: unexpected default system prompt, counting whole prompts")
            return False
        self._system = len(lm.tokenize(prompt[: -len(rendered)]))
        self._priming = len(lm.tokenize(priming))
        [self._start_id] = lm.tokenize(self.START)
        # The pieces add up to the whole prompt as llama.cpp tokenizes it (BOS included).
        pieces = (
            self._system + self._priming + sum(len(lm.tokenize(self._render(**m))) for m in probe)
        )
        if pieces != len(lm.tokenize(prompt, add_special=True)):
            log.warning("local model: prompt tokens are not additive, counting whole prompts")
            return False
        return True

    def count(self, messages: list[dict]) -> int:
        try:
            if self._check() and self._simple(messages):
                return self._count_simple(messages)
            return self._count_whole(_freeze(messages))
        except Exception:
            # llama.cpp unreachable: never under-count, never remember the fallback.
            log.exception("local model: token count failed, using the byte bound")
            return BOUND_DEFAULT_SYSTEM + BOUND_PRIMING + sum(map(_message_bound, messages))

    def _simple(self, messages: list[dict]) -> bool:
        # The last message an assistant's: llama.cpp continues it (prefill), no end, no priming.
        if messages and messages[-1].get("role") == "assistant":
            return False
        return all(
            isinstance(m.get("content"), str)
            and m.get("role") in ("system", "user", "assistant")
            and m.keys() <= {"role", "content"}
            for m in messages
        )

    def _count_simple(self, messages: list[dict]) -> int:
        keys = [(m["role"], m["content"]) for m in messages]
        try:
            total = self._priming + sum([self._messages[key] for key in keys])
        except KeyError:
            counts = self._learn(keys)
            total = self._priming + sum([counts[key] for key in keys])
        if not messages or messages[0]["role"] != "system":
            total += self._system
        return total

    def _learn(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """Counts the messages not yet known, in one llama.cpp call where it can: the batch's
        tokens are split where each message's START token is."""
        lm = self._model()
        known = self._messages
        if len(known) + len(keys) > MESSAGES_KEPT:
            known.clear()
        counts = {key: known[key] for key in keys if key in known}
        missing = [key for key in dict.fromkeys(keys) if key not in counts]
        batch = [key for key in missing if self.START not in key[1]]
        if len(batch) > 1:
            ids = lm.tokenize("".join(self._render(*key) for key in batch))
            starts = [i for i, token in enumerate(ids) if token == self._start_id]
            if len(starts) == len(batch) and starts[0] == 0:
                for key, begin, end in zip(batch, starts, [*starts[1:], len(ids)], strict=True):
                    counts[key] = end - begin
        for key in missing:
            if key not in counts:
                counts[key] = len(lm.tokenize(self._render(*key)))
        known.update(counts)
        return counts

    @functools.lru_cache(maxsize=256)  # noqa: B019 - one instance, module-lived
    def _count_whole(self, frozen: str) -> int:
        lm = self._model()
        return len(lm.tokenize(lm.apply_template(json.loads(frozen)), add_special=True))

    @functools.lru_cache(maxsize=1024)  # noqa: B019 - one instance, module-lived
    def text(self, text: str) -> int:
        # As generated: special-token text in an answer was generated as ordinary pieces.
        return len(self._model().tokenize(text, special=False))


def _freeze(messages: list[dict]) -> str:
    return json.dumps(messages, sort_keys=True, default=str)


MESSAGES_KEPT = 8192
_local = _LocalCounter()


@dataclasses.dataclass(frozen=True)
class _Rates:
    """USD per token, as LiteLLM's price map has them for one model."""

    prompt: float
    cached: float  # a prompt token read from the provider's cache
    completion: float
    reasoning: float  # a completion token spent reasoning
    # Prices that change with the call's size (`*_above_128k_tokens` and the like): every
    # call is then priced by LiteLLM itself.
    tiered: bool


_FREE = _Rates(0.0, 0.0, 0.0, 0.0, tiered=False)


def _litellm_cost(model: str, prompt: int, completion: int, cached: int, reasoning: int) -> float:
    from litellm.types.utils import CompletionTokensDetailsWrapper, PromptTokensDetailsWrapper

    usage = litellm.Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetailsWrapper(cached_tokens=cached),
        completion_tokens_details=CompletionTokensDetailsWrapper(reasoning_tokens=reasoning),
    )
    return sum(litellm.cost_per_token(model=model, usage_object=usage))


@functools.lru_cache(maxsize=256)
def _rates(model: str) -> _Rates | None:
    if is_exact(model):
        return _FREE  # the local model runs here
    try:
        info = litellm.get_model_info(model)
        rates = _Rates(
            prompt=_litellm_cost(model, 1, 0, 0, 0),
            cached=_litellm_cost(model, 1, 0, 1, 0),
            completion=_litellm_cost(model, 0, 1, 0, 0),
            reasoning=_litellm_cost(model, 0, 1, 0, 1),
            tiered=any("_above_" in key and value for key, value in info.items()),
        )
    except Exception:
        return None  # not in LiteLLM's price map
    return rates


def cost(
    model: str, prompt_tokens: int, completion_tokens: int, cached: int = 0, reasoning: int = 0
) -> float | None:
    """The list price in USD of one call's usage, by LiteLLM's price map, the way LiteLLM
    prices a response: `cached` of the prompt tokens at the cache-read rate and `reasoning` of
    the completion tokens at the reasoning rate. None when the model has no price there: the
    cost is unknown, never a silent 0. The local model costs 0.

    Per-model rates are asked of LiteLLM once (a LiteLLM pricing call is ~0.25 ms, on the
    answer's path); a model whose prices depend on the call's size is priced by LiteLLM
    every time. A price in the operator's catalogue (vtai.llm.catalogue) wins over LiteLLM's,
    cached and reasoning tokens included."""
    price = catalogue_price(model)
    if price is not None:
        return price[0] * prompt_tokens + price[1] * completion_tokens
    rates = _rates(model)
    if rates is None:
        return None
    if rates.tiered:
        try:
            return _litellm_cost(model, prompt_tokens, completion_tokens, cached, reasoning)
        except Exception:
            log.warning("pricing %s failed", model, exc_info=True)
            return None
    cached = min(max(cached, 0), prompt_tokens)
    reasoning = min(max(reasoning, 0), completion_tokens)
    return (
        rates.prompt * (prompt_tokens - cached)
        + rates.cached * cached
        + rates.completion * (completion_tokens - reasoning)
        + rates.reasoning * reasoning
    )


@functools.lru_cache(maxsize=256)
def _upper_rates(model: str) -> tuple[float, float] | None:
    rates = _rates(model)
    if rates is None:
        return None
    prompt, completion = max(rates.prompt, rates.cached), max(rates.completion, rates.reasoning)
    if rates.tiered:
        # Priced by size: the dearest tier LiteLLM knows, so a reservation never holds less.
        big = 1_000_000
        try:
            prompt = max(prompt, _litellm_cost(model, big, 0, 0, 0) / big)
            completion = max(completion, _litellm_cost(model, 0, big, 0, 0) / big)
        except Exception:
            return None
    return prompt, completion


def prices(model: str) -> tuple[float, float] | None:
    """(USD per prompt token, USD per completion token) that a dollar reservation holds: the
    catalogue's price, else the highest rate LiteLLM's map has for the model (cached, reasoning
    and size tiers included, so what a call is billed never exceeds it). None: no price known,
    and the model can't be used under a dollar cap (vtai_reserve says price_unknown)."""
    price = catalogue_price(model)
    if price is not None:
        return price
    return _upper_rates(model)
