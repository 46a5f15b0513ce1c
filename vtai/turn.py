"""One chat turn: check the input, fit the context, reserve, stream the model, account.

The success row is written by the LiteLLM callback (vtai.callback) after the reply is done.
This module writes the rows LiteLLM can't see the right way: refusals, which never reach a
model, and failed or stopped streams, which are charged for the tokens that were produced.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import uuid
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import litellm

from vtai import errors, models, tokens
from vtai.callback import META_KEY, CallNotes, estimate_tokens
from vtai.content import content_for_log, redact_secrets
from vtai.gate import Gate, Grant
from vtai.ledger import Ledger, sanitize
from vtai.next_turn import NEW_MESSAGE, NextTurn
from vtai.settings import Settings

log = logging.getLogger(__name__)

# Below this many tokens of room for the answer, a turn is not worth starting.
MIN_COMPLETION = 16
# Reserve a little more than LiteLLM's count: providers tokenize prompts their own way.
# LiteLLM's counter runs 10-17% under SmolLM2's tokenizer, for one.
PROMPT_MARGIN = 1.25


@dataclass
class TurnRequest:
    user_id: uuid.UUID
    session_id: str
    model: str
    history: list[dict]
    text: str
    # The chat's reservation taken ahead (vtai.next_turn); None reserves when the turn starts.
    next_turn: NextTurn | None = None
    # A message refused for its size before it was stored: {"chars": n, "sha256": hex}; `text`
    # is then only a placeholder (vtai.socket_guard).
    oversize: dict | None = None


@dataclass
class TurnOutcome:
    # answered | refused | failed | invalid
    kind: str
    reply: str = ""
    notice: str | None = None
    grant: Grant | None = None
    call_id: str | None = None
    usage: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    trimmed: int = 0


def count_prompt(model: str, messages: list[dict]) -> int:
    """The prompt's size against the model's context window: exact where the model's tokenizer
    runs here (the local model), else LiteLLM's count with a margin."""
    if tokens.is_exact(model):
        return tokens.count_messages(model, messages)
    return math.ceil(tokens.count_messages(model, messages) * PROMPT_MARGIN) + 8


def reserve_prompt(model: str, messages: list[dict], counted: int | None = None) -> int:
    """Prompt tokens to reserve: exact where the count is exact, else an upper bound that no
    tokenizer's count can pass (docs/metering.md, "The bound"), so no answer crosses a limit.
    `counted`: count_prompt's figure for the same messages, if the caller has it."""
    if tokens.is_exact(model):
        return counted if counted is not None else tokens.count_messages(model, messages)
    if counted is None:
        counted = count_prompt(model, messages)
    return max(tokens.upper_bound(model, messages), counted)


def charged_prompt(model: str, messages: list[dict]) -> int:
    """The prompt's tokens when the provider's usage never arrived: the model's own count
    where it is exact, else the best estimate (LiteLLM's tokenizer, tiktoken for OpenAI)."""
    return tokens.count_messages(model, messages)


def fit_context(
    model: str, history: list[dict], message: dict, window: int
) -> tuple[list[dict], int, int]:
    """Drop the oldest turns until the prompt leaves room for an answer.

    Returns (messages, prompt_tokens, dropped_messages); messages is empty if even the new
    message alone does not fit.
    """
    kept = list(history)
    while True:
        messages = [*kept, message]
        counted = count_prompt(model, messages)
        if counted + MIN_COMPLETION <= window:
            return messages, counted, len(history) - len(kept)
        if not kept:
            return [], counted, len(history)
        # drop a whole exchange so the history never starts with an orphaned answer
        kept = kept[2:] if len(kept) >= 2 else []


def refusal_text(grant: Grant, period: str) -> str:
    if grant.reason == "unavailable":
        return "The usage service is unavailable, so no answer was sent: try again shortly."
    if grant.reason == "unknown_user":
        return "Your account no longer exists: sign in again or ask the administrator."
    resets = grant.resets_at.strftime("%Y-%m-%d %H:%M UTC") if grant.resets_at else "never"
    used = f"{grant.used + grant.reserved:,}"
    limit = f"{grant.token_limit:,}" if grant.token_limit is not None else "unlimited"
    head = (
        "Your message is larger than the quota you have left"
        if grant.reason == "prompt_exceeds_quota"
        else "You have used your token quota"
    )
    return (
        f"{head}: {used} of {limit} tokens this {period} on the {grant.tier} tier. "
        f"It resets {resets}. For more, ask the administrator to move you to a higher tier."
    )


async def _close(stream) -> None:
    try:
        await stream.aclose()
    except Exception:
        log.debug("closing the stream failed", exc_info=True)


class TurnRunner:
    def __init__(
        self,
        gate: Gate,
        ledger: Ledger,
        notes: CallNotes,
        settings: Settings,
        call_options: dict | None = None,
    ):
        # call_options reach litellm.acompletion as-is (tests pass mock_response or api_base)
        self.call_options = call_options or {}
        self.gate = gate
        self.ledger = ledger
        self.notes = notes
        self.settings = settings
        self._background: set[asyncio.Task] = set()
        self._holders: weakref.WeakSet[NextTurn] = weakref.WeakSet()

    def _in_background(self, work: Awaitable) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _later(self, row: dict) -> None:
        """Record off the reply's path: on disk before the turn returns, in the DB soon after."""
        held = self.ledger.hold(row)
        self._in_background(self.ledger.record(row, held))

    async def _finish_stream(self, stream, call_id: str) -> None:
        """The rest of an answered stream: LiteLLM finishes it and runs its success hooks, and
        the callback writes the turn's full row. If that end fails, the row held on disk when
        the answer came is the record instead (a write is idempotent on the call id)."""
        try:
            async for _chunk in stream:
                pass
        except Exception as exc:
            log.warning("the end of call %s's stream failed (%s)", call_id, type(exc).__name__)
            held = self.notes.provisional.pop(call_id, None)
            if held is not None:
                self.notes.claimed.add(call_id)
                await self.ledger.record(held.row, held)
        finally:
            await _close(stream)

    def next_turn(self) -> NextTurn | None:
        """A new chat's holder of reservations taken ahead, if VTAI_RESERVE_AHEAD is on."""
        if not self.settings.reserve_ahead:
            return None
        holder = NextTurn(self.gate, self.settings.reservation_ttl, self.settings.request_timeout)
        self._holders.add(holder)
        return holder

    async def release_ahead(self) -> None:
        """At shutdown: the open chats' reservations go back now, not at their TTL."""
        await asyncio.gather(*(h.release() for h in list(self._holders)), return_exceptions=True)

    def reserve_ahead(
        self,
        holder: NextTurn | None,
        user_id: uuid.UUID,
        model: str,
        history: list[dict],
        counted: int | None = None,
    ) -> None:
        """Start reserving the chat's next turn: the chat so far, a new message, an answer.

        `counted`: the chat so far in prompt tokens, if the caller knows it; it only sizes the
        reservation, and a turn it doesn't cover reserves for itself."""
        if holder is None:
            return

        def size() -> tuple[int, int]:
            so_far = counted if counted is not None else reserve_prompt(model, history)
            # A bound counts bytes, about four to a token of English.
            prompt = so_far + (NEW_MESSAGE if tokens.is_exact(model) else 4 * NEW_MESSAGE)
            window = models.context_window(model)
            room = window - count_prompt(model, history) - NEW_MESSAGE
            return prompt, min(self.settings.max_tokens, room)

        holder.prepare(user_id, size)

    async def _reserve(self, req: TurnRequest, prompt_tokens: int, budget: int) -> Grant:
        if req.next_turn is not None:
            grant = await req.next_turn.take(req.user_id, prompt_tokens, budget)
            if grant is not None:
                return grant
        return await self.gate.reserve(req.user_id, prompt_tokens, budget)

    async def drain(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def _row(
        self,
        req: TurnRequest,
        call_id: str,
        status: str,
        grant: Grant | None,
        messages: list[dict],
        **extra,
    ) -> dict:
        details = {
            "tier": grant.tier if grant else None,
            "max_tokens": grant.max_tokens if grant else 0,
            **extra.pop("details", {}),
        }
        return {
            "litellm_call_id": call_id,
            "created_at": datetime.now(UTC).isoformat(),
            "end_user": str(req.user_id),
            "session_id": req.session_id,
            "model": req.model,
            "status": status,
            "reservation_id": str(grant.reservation_id) if grant and grant.reservation_id else None,
            "period_start": grant.period_start.isoformat()
            if grant and grant.period_start
            else None,
            "messages": content_for_log(messages, self.settings.log_content),
            "additional_details": details,
            **extra,
        }

    def offered(self) -> list[str]:
        """The models this server runs for a user: the chat's picker list, checked per turn."""
        return models.available_models(self.settings.model)

    def _refuse(
        self, req: TurnRequest, call_id: str, notice: str, grant: Grant | None, **details
    ) -> TurnOutcome:
        """A turn that never reaches a model: one line for the user and a row, charged 0."""
        messages = [] if req.oversize else [{"role": "user", "content": req.text}]
        self._later(self._row(req, call_id, "refused", grant, messages, details=details))
        return TurnOutcome(
            "refused", notice=notice, grant=grant, call_id=call_id, history=req.history
        )

    async def run(
        self, req: TurnRequest, on_token: Callable[[str], Awaitable[None]]
    ) -> TurnOutcome:
        call_id = str(uuid.uuid4())
        limit = self.settings.max_message_chars
        if req.oversize is None and len(req.text or "") > limit:
            req.oversize = oversize(req.text)
        if req.oversize is not None:
            chars = req.oversize["chars"]
            return self._refuse(
                req,
                call_id,
                f"Your message is {chars:,} characters long, over the {limit:,}-character "
                "limit: shorten it or split it up. It was not sent or stored.",
                None,
                reason="message_too_long",
                **req.oversize,
            )
        if req.model not in self.offered():
            # Nothing leaves the server for a model nobody offered this user.
            return self._refuse(
                req,
                call_id,
                f"The model {req.model!r} is not offered here: pick one from the chat settings.",
                None,
                reason="model_not_offered",
            )
        text = sanitize(req.text or "").strip()
        if not text:
            return TurnOutcome(
                "invalid", notice="Empty message: type something to send.", history=req.history
            )
        message = {"role": "user", "content": text}
        window = models.context_window(req.model)
        messages, prompt_tokens, dropped = fit_context(req.model, req.history, message, window)
        if not messages:
            return self._refuse(
                req,
                call_id,
                f"Your message is too long for {req.model} (about {prompt_tokens:,} tokens; "
                f"it takes {window:,} including the answer): shorten it or split it up.",
                None,
                reason="context_exceeded",
                prompt_tokens_estimate=prompt_tokens,
            )

        budget = min(self.settings.max_tokens, window - prompt_tokens)
        reserved_prompt = reserve_prompt(req.model, messages, prompt_tokens)
        grant = await self._reserve(req, reserved_prompt, budget)
        if not grant.granted:
            self._later(
                self._row(
                    req, call_id, "refused", grant, messages, details={"reason": grant.reason}
                )
            )
            return TurnOutcome(
                "refused",
                notice=refusal_text(grant, self.settings.usage_period),
                grant=grant,
                call_id=call_id,
                history=req.history,
            )

        notice = None
        if dropped:
            notice = (
                f"The conversation outgrew {req.model}'s context, so the oldest "
                f"{dropped} messages were left out of this answer."
            )
        facts = {
            "user_id": str(req.user_id),
            "session_id": req.session_id,
            "tier": grant.tier,
            "model": req.model,
            "max_tokens": grant.max_tokens,
            "reservation_id": str(grant.reservation_id) if grant.reservation_id else None,
            "period_start": grant.period_start.isoformat() if grant.period_start else None,
            "trimmed": dropped,
        }
        parts: list[str] = []
        usage: dict = {}
        finish = None
        stream = None
        # sent: the prompt may have reached the provider, which bills it if it is processed
        # (a stop doesn't undo that); a call that fails before its stream starts was refused
        # by the provider (a bad key, a rate limit, an error status) and is not billed.
        sent = False
        complete = False
        try:
            sent = True
            stream = await litellm.acompletion(
                model=req.model,
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
                max_tokens=grant.max_tokens,
                timeout=self.settings.request_timeout,
                litellm_call_id=call_id,
                metadata={META_KEY: facts},
                **self.call_options,
            )
            async for chunk in stream:
                if getattr(chunk, "usage", None):
                    usage = {
                        "prompt_tokens": chunk.usage.prompt_tokens,
                        "completion_tokens": chunk.usage.completion_tokens,
                        "total_tokens": chunk.usage.total_tokens,
                    }
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
                delta = chunk.choices[0].delta.content if chunk.choices else None
                if delta:
                    parts.append(delta)
                    await on_token(delta)
                if finish and usage:
                    # The answer and its usage are in (the usage chunk comes last). LiteLLM's
                    # end of stream, which runs its success hooks, comes after the reply is
                    # returned: see _finish_stream.
                    break
            # Synchronously, before LiteLLM's logging worker runs the success hook.
            estimated = not any(getattr(c, "usage", None) for c in getattr(stream, "chunks", []))
            if estimated:
                self.notes.estimated.add(call_id)
            self._hold_provisional(req, call_id, grant, messages, "".join(parts), usage, estimated)
            complete = True
            self._in_background(self._finish_stream(stream, call_id))
        except asyncio.CancelledError:
            # A stop or a client gone for good: charge what the provider bills, then let the
            # cancel through.
            self._record_partial(req, call_id, grant, messages, parts, usage, None, sent)
            raise
        except Exception as exc:
            accepted = stream is not None
            self._record_partial(req, call_id, grant, messages, parts, usage, exc, accepted)
            self.reserve_ahead(req.next_turn, req.user_id, req.model, req.history)
            return TurnOutcome(
                "failed",
                reply="".join(parts),
                notice=errors.user_message(
                    exc, req.model, self.settings.request_timeout, partial=bool(parts)
                ),
                grant=grant,
                call_id=call_id,
                history=req.history,
            )
        finally:
            # Stops a local generation at once; a provider stream closes its connection.
            if not complete and stream is not None and hasattr(stream, "aclose"):
                await asyncio.shield(_close(stream))
        reply = "".join(parts)
        history = [*messages, {"role": "assistant", "content": reply}]
        self.reserve_ahead(req.next_turn, req.user_id, req.model, history)
        if finish == "length":
            cut = (
                "your quota is nearly used up"
                if grant.max_tokens < self.settings.max_tokens
                else "it reached the longest answer allowed"
            )
            notice = " ".join(filter(None, [notice, f"The answer was cut short: {cut}."]))
        return TurnOutcome(
            "answered",
            reply=reply,
            notice=notice,
            grant=grant,
            call_id=call_id,
            usage=usage,
            history=history,
            trimmed=dropped,
        )

    def _hold_provisional(
        self,
        req: TurnRequest,
        call_id: str,
        grant: Grant,
        messages: list[dict],
        reply: str,
        usage: dict,
        estimated: bool,
    ) -> None:
        """Put the answered turn's row on disk until LiteLLM's success hook records the full
        one (and deletes this). If the process dies first, or the hook never runs, start-up
        replays this row instead, so an answer that reached the user is always billed."""
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if prompt is None or completion is None:
            prompt, completion = estimate_tokens(req.model, messages, reply)
        self.notes.provisional[call_id] = self.ledger.hold(
            self._row(
                req,
                call_id,
                "success",
                grant,
                messages,
                prompt_tokens=prompt,
                completion_tokens=completion,
                total_tokens=prompt + completion,
                total_cost=tokens.cost(req.model, prompt, completion),
                response=content_for_log(reply, self.settings.log_content),
                details={"provisional": True, "estimated": estimated},
            )
        )

    def _record_partial(
        self,
        req: TurnRequest,
        call_id: str,
        grant: Grant,
        messages: list[dict],
        parts: list[str],
        usage: dict,
        exc: Exception | None,
        sent: bool,
    ) -> None:
        """The row of a stopped, abandoned or failed stream, charged what the provider bills:
        its usage if the stream delivered it, else the prompt if `sent` (billed even when no
        token came) plus the tokens that streamed, counted by the model's tokenizer where it
        runs here (exact) and estimated otherwise."""
        self.notes.claimed.add(call_id)
        produced = "".join(parts)
        if usage.get("prompt_tokens") is not None and usage.get("completion_tokens") is not None:
            prompt, completion, estimated = (
                usage["prompt_tokens"],
                usage["completion_tokens"],
                False,
            )
        else:
            prompt = charged_prompt(req.model, messages) if sent else 0
            completion = tokens.count_text(req.model, produced) if produced else 0
            estimated = not tokens.is_exact(req.model)
        error = None
        if exc is not None:
            error = {
                "class": type(exc).__name__,
                "code": str(getattr(exc, "status_code", "") or ""),
                "message": redact_secrets(str(exc))[:2000],
            }
        self._later(
            self._row(
                req,
                call_id,
                "success" if exc is None else "failure",
                grant,
                messages,
                prompt_tokens=prompt,
                completion_tokens=completion,
                total_tokens=prompt + completion,
                total_cost=tokens.cost(req.model, prompt, completion),
                response=content_for_log(produced, self.settings.log_content) if produced else None,
                error=error,
                details={
                    "estimated": estimated,
                    "aborted": exc is None,
                    "streamed_tokens": completion,
                    "reservation_id": str(grant.reservation_id) if grant.reservation_id else None,
                },
            )
        )


def oversize(text: str) -> dict:
    """What a refused message's row keeps of it: its size and a hash, never the text."""
    return {
        "chars": len(text),
        "sha256": hashlib.sha256(text.encode("utf-8", "replace")).hexdigest(),
    }
