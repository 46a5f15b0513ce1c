"""The request_logs row, built in one place from the facts of a turn and the usage it had.

Every row VT.ai writes comes from `build()`: the answered turn's (LiteLLM's success hook adds
usage and timing to the facts it carries in `metadata["vtai"]`), the provisional copy held on
disk until then, and the turn's own rows for refusals, failures and stopped streams. So every
path prices tokens the same way (`vtai.llm.tokens.cost`, cached and reasoning tokens included),
sets the provider, and flags what it had to estimate or could not price.

`OpenCalls` is the one thing the turn and the logger share: an entry per model call, made when
the call starts and taken by whichever of them writes the call's row.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import litellm

from vtai.llm import tokens
from vtai.metering.content import content_for_log, redact_secrets
from vtai.metering.journal import Hold

log = logging.getLogger(__name__)

META_KEY = "vtai"  # a turn's Facts travel to LiteLLM's hooks in metadata["vtai"]


@functools.lru_cache(maxsize=256)
def provider_of(model: str) -> str | None:
    """LiteLLM's name for the model's provider (openai, anthropic, ...; `local` for ours)."""
    try:
        return litellm.get_llm_provider(model)[1]
    except Exception:
        return model.split("/", 1)[0] if "/" in model else None


@dataclasses.dataclass(frozen=True)
class Facts:
    """What a turn knows about its model call before making it."""

    call_id: str
    user_id: str
    session_id: str | None
    model: str
    provider: str | None = None
    tier: str | None = None
    max_tokens: int = 0
    reservation_id: str | None = None
    period_start: str | None = None
    # messages left out of the context (the model's window, or the quota left)
    trimmed: int = 0
    # chat or api, and the API key the call came with
    source: str = "chat"
    api_key_id: str | None = None
    # when the call started: every row of the call carries the same created_at
    created_at: str = dataclasses.field(default_factory=lambda: datetime.now(UTC).isoformat())

    def meta(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_meta(cls, meta: Any) -> Facts | None:
        if not isinstance(meta, dict) or not meta.get("call_id"):
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in meta.items() if k in names})


@dataclasses.dataclass(frozen=True)
class Tokens:
    """One call's usage: the provider's, or an estimate (`estimated`)."""

    prompt: int = 0
    completion: int = 0
    # of the prompt tokens, those read from the provider's prompt cache (billed lower)
    cached: int = 0
    # of the completion tokens, those spent reasoning
    reasoning: int = 0
    estimated: bool = False

    @property
    def total(self) -> int:
        return self.prompt + self.completion

    @classmethod
    def from_usage(cls, usage: Any, estimated: bool = False) -> Tokens | None:
        """From a provider's usage (LiteLLM's Usage object, or its dict); None without one."""
        if not usage:
            return None
        prompt, completion = _field(usage, "prompt_tokens"), _field(usage, "completion_tokens")
        if prompt is None or completion is None:
            return None
        return cls(
            int(prompt),
            int(completion),
            int(_field(_field(usage, "prompt_tokens_details"), "cached_tokens") or 0),
            int(_field(_field(usage, "completion_tokens_details"), "reasoning_tokens") or 0),
            estimated,
        )

    def cost(self, model: str) -> float | None:
        if not self.total:
            return 0.0
        return tokens.cost(model, self.prompt, self.completion, self.cached, self.reasoning)


def _field(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def estimate(model: str, messages: list | None, completion_text: str) -> Tokens:
    """Tokens by our own count, for a call whose provider reported no usage: the model's
    tokenizer where it runs here (exact, not flagged), else LiteLLM's (flagged estimated)."""
    try:
        prompt = tokens.count_messages(model, messages or [])
    except Exception:
        prompt = litellm.token_counter(text=str(messages or ""))
    completion = tokens.count_text(model, completion_text) if completion_text else 0
    return Tokens(prompt, completion, estimated=not tokens.is_exact(model))


def error_info(exc: BaseException) -> dict:
    """A failure as the row keeps it: class, code and the redacted message."""
    return {
        "class": type(exc).__name__,
        "code": str(getattr(exc, "status_code", "") or "") or None,
        "message": redact_secrets(str(exc))[:2000],
    }


def build(
    facts: Facts,
    status: str,
    log_content: str,
    *,
    usage: Tokens | None = None,
    messages: Any = None,
    response: str | None = None,
    error: dict | None = None,
    response_time: float | None = None,
    details: dict | None = None,
) -> dict:
    """The request_logs row for one call (see docs/metering.md): `status` is success, failure
    or refused; `usage` None means nothing was charged."""
    usage = usage or Tokens()
    cost = usage.cost(facts.model)
    row_details = {
        "tier": facts.tier,
        "max_tokens": facts.max_tokens,
        "reservation_id": facts.reservation_id,
        "trimmed_messages": facts.trimmed,
        "estimated": usage.estimated,
        # The typed columns of the same names take these out of additional_details when the
        # row is inserted (supabase/migrations/20261201000900_ledger_token_columns.sql).
        "cached_tokens": usage.cached,
        "reasoning_tokens": usage.reasoning,
        **(details or {}),
    }
    if cost is None:
        row_details["cost_unknown"] = True
    return {
        "litellm_call_id": facts.call_id,
        "created_at": facts.created_at,
        "end_user": facts.user_id,
        "session_id": facts.session_id,
        "model": facts.model,
        "provider": facts.provider,
        "status": status,
        "prompt_tokens": usage.prompt,
        "completion_tokens": usage.completion,
        "total_tokens": usage.total,
        "total_cost": cost,
        "response_time": response_time,
        "reservation_id": facts.reservation_id,
        "period_start": facts.period_start,
        "messages": content_for_log(messages, log_content),
        "response": content_for_log(response, log_content) if response else None,
        "error": error,
        "additional_details": row_details,
        "source": facts.source,
        "api_key_id": facts.api_key_id,
    }


@dataclasses.dataclass(eq=False)
class OpenCall:
    """A model call whose row is not written yet."""

    facts: Facts
    # the answered turn's row, on disk until the success hook writes the full one
    provisional: Hold | None = None
    # the provider sent no usage: LiteLLM's usage in the success event is its own count
    estimated: bool = False
    # set once the row is recorded (in the database, or spooled): True/False/None as
    # Ledger.record answers
    settled: asyncio.Future = dataclasses.field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    async def record(self, write: Callable[[], Awaitable[bool | None]]) -> bool | None:
        """Run the row's write and settle the entry with its answer (or its error)."""
        try:
            result = await write()
        except BaseException as exc:
            if not self.settled.done():
                self.settled.set_exception(exc)
                self.settled.exception()  # retrieved: no "never retrieved" warning
            raise
        if not self.settled.done():
            self.settled.set_result(result)
        return result


class OpenCalls:
    """The turn's model calls between their start and their row.

    `open()` when the call starts; `take()` by whoever writes the call's row, exactly once:
    the turn for a failed or stopped call (and for an answered one whose success hook never
    came), LiteLLM's success hook for an answered one. A hook that finds no entry knows the
    turn wrote the row.
    """

    def __init__(self) -> None:
        self._calls: dict[str, OpenCall] = {}

    def open(self, facts: Facts) -> OpenCall:
        call = OpenCall(facts)
        self._calls[facts.call_id] = call
        return call

    def take(self, call_id: str | None) -> OpenCall | None:
        return self._calls.pop(call_id, None) if call_id else None

    def __contains__(self, call_id: object) -> bool:
        return call_id in self._calls

    def __len__(self) -> int:
        return len(self._calls)
