"""The LiteLLM callback that writes an answered turn's request_logs row.

LiteLLM runs these hooks in its background logging worker, after the reply has reached the
user, so the ledger write is off the reply's path. They never raise into LiteLLM.

The row is vtai.metering.rows.build's: the facts the turn sent along in `metadata["vtai"]`, plus the
usage and timing LiteLLM reports. Only answered calls are written here. A failed or stopped
call's row is the turn's, which sees every such call end and knows what streamed; its entry
in OpenCalls is then gone, and the hook writes nothing.
"""

from __future__ import annotations

import logging

from litellm.integrations.custom_logger import CustomLogger

from vtai.metering import rows
from vtai.metering.ledger import Ledger
from vtai.metering.rows import META_KEY, OpenCalls
from vtai.ops import metrics

log = logging.getLogger(__name__)

__all__ = ["META_KEY", "CallNotes", "MeteringLogger", "estimate_tokens", "row_from_event"]

# The name callers outside this module know the registry by.
CallNotes = OpenCalls


def estimate_tokens(model: str, messages: list | None, completion_text: str) -> tuple[int, int]:
    """(prompt, completion) by our own count, for a call with no usage from its provider."""
    counted = rows.estimate(model, messages, completion_text)
    return counted.prompt, counted.completion


def _response_text(slo: dict) -> str:
    response = slo.get("response") or {}
    try:
        return response["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        return ""


def row_from_event(
    kwargs: dict, response_obj, log_content: str, estimated: bool = False
) -> dict | None:
    """The success row for a LiteLLM event, or None when the call was not a metered turn."""
    meta = (kwargs.get("litellm_params") or {}).get("metadata") or {}
    facts = rows.Facts.from_meta(meta.get(META_KEY))
    if facts is None:
        return None
    slo = kwargs.get("standard_logging_object") or {}
    messages = slo.get("messages") or kwargs.get("messages")
    text = _response_text(slo)
    usage = rows.Tokens.from_usage(getattr(response_obj, "usage", None), estimated)
    if usage is None or not usage.total:
        # No usage at all: our own count, flagged.
        usage = rows.estimate(facts.model, messages, text)
        usage = rows.Tokens(usage.prompt, usage.completion, estimated=True)
    start, first = slo.get("startTime"), slo.get("completionStartTime")
    return rows.build(
        facts,
        "success",
        log_content,
        usage=usage,
        messages=messages,
        response=text,
        response_time=slo.get("response_time"),
        details={
            "time_to_first_token": (first - start) if isinstance(first, float) and start else None,
            "stream": bool(slo.get("stream")),
        },
    )


class MeteringLogger(CustomLogger):
    def __init__(self, ledger: Ledger, log_content: str = "full", notes: OpenCalls | None = None):
        super().__init__()
        self.ledger = ledger
        self.log_content = log_content
        # the turn's open calls (vtai.metering.rows.OpenCalls), shared with its TurnRunner
        self.notes = notes if notes is not None else OpenCalls()

    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
        call_id = kwargs.get("litellm_call_id")
        try:
            call = self.notes.take(call_id)
            if call is None:
                # Not a turn's call, or the turn wrote its row (a stop, a failure).
                return
            row = row_from_event(kwargs, response_obj, self.log_content, call.estimated)
            if row is None:
                row = call.provisional.row if call.provisional else None
            if row is None:
                return
            # The full row on disk first, then the provisional copy can go.
            held = self.ledger.hold(row)
            if call.provisional is not None:
                call.provisional.release()
            await call.record(lambda: self.ledger.record(row, held))
        except Exception:
            # Never into LiteLLM: a row held on disk is replayed at the next start-up.
            log.exception("metering callback failed for call %s", call_id)
            metrics.callback_failed()

    async def async_log_failure_event(self, kwargs, response_obj, start_time, end_time):
        # A failed call's row is the turn's (vtai.metering.turn), written with what streamed;
        # LiteLLM also reports each failed attempt here, which must not make a second write.
        return None
