"""The LiteLLM callback that turns every metered model call into one request_logs row.

LiteLLM runs these hooks in its background logging worker, after the reply has reached the
user, so the ledger write is off the reply's path. They never raise into LiteLLM.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any

import litellm
from litellm.integrations.custom_logger import CustomLogger

from vtai import tokens
from vtai.content import content_for_log, redact_secrets
from vtai.inflight import Hold
from vtai.ledger import Ledger

log = logging.getLogger(__name__)

META_KEY = "vtai"  # our per-call facts travel in metadata["vtai"]


class _BoundedSet:
    """The newest `size` strings added; old ones fall out so memory stays flat."""

    def __init__(self, size: int = 10_000):
        self._items: OrderedDict[str, None] = OrderedDict()
        self._size = size

    def add(self, item: str) -> None:
        self._items[item] = None
        while len(self._items) > self._size:
            self._items.popitem(last=False)

    def __contains__(self, item: object) -> bool:
        return item in self._items


class CallNotes:
    """What the chat turn knows about a call that LiteLLM's event doesn't say.

    `claimed`: calls whose row the turn writes itself (stopped or broken streams), so the row
    carries the tokens actually produced and LiteLLM's failure hook skips them.
    `estimated`: streams whose provider sent no usage; LiteLLM then fills usage in with its
    token counter without saying so, and the row must be flagged.
    `provisional`: answered turns' rows held on disk until the success hook writes its own.
    The turn notes both before LiteLLM's logging worker gets to run the hook.
    """

    def __init__(self) -> None:
        self.claimed = _BoundedSet()
        self.estimated = _BoundedSet()
        # call id -> the answered turn's provisional row on disk, until the hook records it
        self.provisional: dict[str, Hold] = {}


def _when(ts: Any) -> str:
    if isinstance(ts, int | float):
        return datetime.fromtimestamp(ts, UTC).isoformat()
    if isinstance(ts, datetime):
        return (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).isoformat()
    return datetime.now(UTC).isoformat()


def estimate_tokens(model: str, messages: list | None, completion_text: str) -> tuple[int, int]:
    """Tokens by LiteLLM's counter, for providers that report no usage."""
    try:
        prompt = tokens.count_messages(model, messages or [])
    except Exception:
        prompt = litellm.token_counter(text=str(messages or ""))
    completion = litellm.token_counter(model=model, text=completion_text) if completion_text else 0
    return prompt, completion


def _response_text(slo: dict) -> str:
    response = slo.get("response") or {}
    try:
        return response["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        return ""


def row_from_event(
    kwargs: dict, status: str, log_content: str, estimated: bool = False
) -> dict | None:
    """The ledger row for a LiteLLM event, or None when the call was not a metered turn."""
    meta = (kwargs.get("litellm_params") or {}).get("metadata") or {}
    facts = meta.get(META_KEY)
    if not facts:
        return None
    slo = kwargs.get("standard_logging_object") or {}
    model = facts.get("model") or slo.get("model") or kwargs.get("model") or ""
    messages = slo.get("messages") or kwargs.get("messages")
    text = _response_text(slo)
    prompt = int(slo.get("prompt_tokens") or 0)
    completion = int(slo.get("completion_tokens") or 0)
    if status == "success" and prompt == 0 and completion == 0:
        prompt, completion = estimate_tokens(model, messages, text)
        estimated = True
    start, first = slo.get("startTime"), slo.get("completionStartTime")
    details = {
        "estimated": estimated,
        "tier": facts.get("tier"),
        "max_tokens": facts.get("max_tokens"),
        "reservation_id": facts.get("reservation_id"),
        "time_to_first_token": (first - start) if isinstance(first, float) and start else None,
        "stream": bool(slo.get("stream")),
        "trimmed_messages": facts.get("trimmed", 0),
    }
    error = None
    if status == "failure":
        info = slo.get("error_information") or {}
        exc = kwargs.get("exception")
        error = {
            "class": info.get("error_class") or type(exc).__name__,
            "code": info.get("error_code"),
            "message": redact_secrets(slo.get("error_str") or str(exc or ""))[:2000],
        }
    cost = slo.get("response_cost")
    return {
        "litellm_call_id": kwargs.get("litellm_call_id") or slo.get("id"),
        "created_at": _when(slo.get("startTime")),
        "end_user": facts.get("user_id"),
        "session_id": facts.get("session_id"),
        "model": model,
        "provider": slo.get("custom_llm_provider") or facts.get("provider"),
        "status": status,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "total_cost": float(cost) if cost else 0.0,
        "response_time": slo.get("response_time"),
        "reservation_id": facts.get("reservation_id"),
        "period_start": facts.get("period_start"),
        "messages": content_for_log(messages, log_content),
        "response": content_for_log(text, log_content) if status == "success" else None,
        "error": error,
        "additional_details": details,
    }


class MeteringLogger(CustomLogger):
    def __init__(self, ledger: Ledger, log_content: str = "full", notes: CallNotes | None = None):
        super().__init__()
        self.ledger = ledger
        self.log_content = log_content
        self.notes = notes or CallNotes()

    async def _handle(self, kwargs: dict, status: str) -> None:
        try:
            call_id = kwargs.get("litellm_call_id")
            if call_id in self.notes.claimed:
                return
            row = row_from_event(kwargs, status, self.log_content, call_id in self.notes.estimated)
            if row is not None:
                await self.ledger.record(row)
            provisional = self.notes.provisional.pop(call_id, None)
            if provisional is not None:
                provisional.release()
        except Exception:
            # Never into LiteLLM: the row's reservation expires after its TTL instead.
            log.exception("metering callback failed for call %s", kwargs.get("litellm_call_id"))

    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
        await self._handle(kwargs, "success")

    async def async_log_failure_event(self, kwargs, response_obj, start_time, end_time):
        await self._handle(kwargs, "failure")
