"""One chat turn: check the input, fit the context, reserve, stream the model, account.

Every row is built by vtai.metering.rows. An answered turn's full row is written by the LiteLLM
callback (vtai.metering.logger) after the reply is done; this module writes the rows LiteLLM can't
see the right way: refusals, which never reach a model, and failed or stopped calls, charged
for the tokens that were produced. The two meet in one place, vtai.metering.rows.OpenCalls.
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

import litellm

from vtai.llm import errors, models, tokens
from vtai.llm.catalogue import Catalogue
from vtai.metering import rows
from vtai.metering.ahead import NEW_MESSAGE, NextTurn
from vtai.metering.encoding import sanitize
from vtai.metering.gate import PROMPT_REASONS, Grant
from vtai.metering.ledger import Ledger
from vtai.metering.ports import UsageGate
from vtai.metering.refusal import MIN_COMPLETION, refusal
from vtai.metering.rows import META_KEY, Facts, OpenCall, OpenCalls, Tokens
from vtai.ops import metrics
from vtai.settings import Settings

log = logging.getLogger(__name__)

# Reserve a little more than LiteLLM's count: providers tokenize prompts their own way.
# LiteLLM's counter runs 10-17% under SmolLM2's tokenizer, for one.
PROMPT_MARGIN = 1.25

# A cap that leaves less answer than this (or than the answer asked for, if less) makes the turn
# a choice (a short answer, or a free model) instead of an answer cut off mid-sentence.
SHORT_ANSWER = 256

# Retries (docs/metering.md, "Retries and the deadline"): LiteLLM and the provider's SDK retry
# nothing (num_retries=0, max_retries=0). VT.ai retries a request that failed before its answer
# began, at most RETRIES times, only on a provider's server error (5xx) or a failed connection,
# after RETRY_DELAY seconds, and only while the turn is within VTAI_REQUEST_TIMEOUT of its first
# request. A rate limit, a timeout or a refused request is not retried.
RETRIES = 1
RETRY_DELAY = 0.5
RETRY_STATUS = frozenset({500, 502, 503, 504})
# An answered turn's background task waits this long for LiteLLM's success hook to write the
# full row (LiteLLM's logging worker gives a hook 20 s); then the row held at the answer is
# recorded instead.
HOOK_WAIT = 60.0
# An in-flight turn's progress goes to the journal every this many streamed tokens: if its
# process dies, recovery charges the prompt and the tokens streamed by the last such line.
STREAMED_EVERY = 8
PROCESS_DIED = (
    "the app process ended mid-answer; charged the prompt and the tokens streamed before it"
)


@dataclass
class TurnRequest:
    user_id: uuid.UUID
    session_id: str
    model: str
    history: list[dict]
    text: str
    # The chat's reservation taken ahead (vtai.metering.ahead); None reserves when the turn starts.
    next_turn: NextTurn | None = None
    # A message refused for its size before it was stored: {"chars": n, "sha256": hex}; `text`
    # is then only a placeholder (vtai.ui.socket_guard).
    oversize: dict | None = None
    # The user chose a short answer at the limit: an answer budget clamped below SHORT_ANSWER
    # by a cap is accepted rather than offered as a choice first.
    accept_short: bool = False
    # Where the turn came from: "chat", or "api" with the key it came with (vtai.api).
    source: str = "chat"
    api_key_id: uuid.UUID | None = None
    # The longest answer the client asked for (the API's max_tokens); never above
    # VTAI_MAX_TOKENS.
    max_tokens: int | None = None


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
    # the model's finish reason for an answered turn: stop, length, ...
    finish: str | None = None
    # a refused turn's reason, as its row has it (model_not_offered, quota_exhausted, ...)
    reason: str | None = None
    # Done once the turn's row is recorded (in the database, or spooled): what the quota line
    # waits for before it reads the counter. None when the turn wrote no row.
    settled: Awaitable | None = None


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
    model: str,
    history: list[dict],
    message: dict,
    room: int,
    measure: Callable[[str, list[dict]], int] = count_prompt,
) -> tuple[list[dict], int, int]:
    """Drop the oldest turns until the prompt, as `measure` sizes it, leaves room for an
    answer in `room` tokens (the model's context window, or the quota left).

    Returns (messages, prompt_tokens, dropped_messages); messages is empty if even the new
    message alone does not fit.
    """
    kept = list(history)
    while True:
        messages = [*kept, message]
        counted = measure(model, messages)
        if counted + MIN_COMPLETION <= room:
            return messages, counted, len(history) - len(kept)
        if not kept:
            return [], counted, len(history)
        # drop a whole exchange so the history never starts with an orphaned answer
        kept = kept[2:] if len(kept) >= 2 else []


def is_retryable(exc: BaseException) -> bool:
    """A provider's server error or a connection that failed: worth one more request. Not a
    timeout (the turn's time is spent), a rate limit, or a request the provider refused."""
    if isinstance(exc, litellm.Timeout):
        return False
    if isinstance(exc, litellm.APIConnectionError):
        return True
    return getattr(exc, "status_code", None) in RETRY_STATUS


def _as_timeout(exc: BaseException, model: str, timeout: float) -> BaseException:
    """The deadline's own TimeoutError as LiteLLM's Timeout, as the user's line expects."""
    if isinstance(exc, TimeoutError) and not isinstance(exc, litellm.Timeout):
        return litellm.Timeout(
            message=f"no answer within {timeout:.0f} s", model=model, llm_provider=""
        )
    return exc


async def _close(stream) -> None:
    try:
        await stream.aclose()
    except Exception:
        log.debug("closing the stream failed", exc_info=True)


class TurnRunner:
    def __init__(
        self,
        gate: UsageGate,
        ledger: Ledger,
        calls: OpenCalls,
        settings: Settings,
        call_options: dict | None = None,
        catalogue: Catalogue | None = None,
    ):
        # call_options reach litellm.acompletion as-is (tests pass mock_response or api_base)
        self.call_options = call_options or {}
        # The operator's models (vtai.llm.catalogue); None: the built-in list.
        self.catalogue = catalogue
        self.gate = gate
        self.ledger = ledger
        # shared with the LiteLLM callback: which of the two writes a call's row
        self.calls = calls
        self.settings = settings
        self._background: set[asyncio.Task] = set()
        self._holders: weakref.WeakSet[NextTurn] = weakref.WeakSet()
        # Set by vtai.services when plan changes are heard; without it nothing is held ahead.
        self.plan_watch = None

    def _in_background(self, work: Awaitable) -> asyncio.Future:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _later(self, row: dict, call: OpenCall | None = None) -> Awaitable:
        """Record off the reply's path: on disk before the turn returns, in the DB soon after.
        Returns what is done once the row is recorded."""
        held = self.ledger.hold(row)

        def write() -> Awaitable[bool | None]:
            return self.ledger.record(row, held)

        if call is None:
            return self._in_background(write())
        self._in_background(call.record(write))
        return call.settled

    async def _finish_stream(self, stream, call: OpenCall) -> None:
        """The rest of an answered stream: LiteLLM finishes it and runs its success hooks, and
        the callback writes the turn's full row. If that end fails, or the hook never comes,
        the row held on disk when the answer came is the record instead (a write is
        idempotent on the call id)."""
        call_id = call.facts.call_id
        try:
            async for _chunk in stream:
                pass
        except Exception as exc:
            log.warning("the end of call %s's stream failed (%s)", call_id, type(exc).__name__)
        else:
            try:
                await asyncio.wait_for(asyncio.shield(call.settled), HOOK_WAIT)
            except TimeoutError:
                log.warning("no success hook for call %s in %.0f s", call_id, HOOK_WAIT)
            except Exception:
                pass  # the hook's write failed: it logged why, and the row is on disk
        finally:
            await _close(stream)
        if self.calls.take(call_id) is not None and call.provisional is not None:
            held = call.provisional
            await call.record(lambda: self.ledger.record(held.row, held))

    def next_turn(self) -> NextTurn | None:
        """A new chat's holder of reservations taken ahead, if VTAI_RESERVE_AHEAD is on."""
        if not self.settings.reserve_ahead or self.plan_watch is None:
            return None
        watch = self.plan_watch
        holder = NextTurn(
            self.gate,
            self.settings.reservation_ttl,
            self.settings.request_timeout,
            live=lambda: watch.live,
        )
        self._holders.add(holder)
        return holder

    def plans_changed(self) -> None:
        """A plan changed (vtai.metering.plan_watch): every chat's reservation taken ahead
        goes back, so each next turn is reserved under the plan as it is now."""
        for holder in list(self._holders):
            holder.drop()
        if self.catalogue is not None:
            self.catalogue.expire()

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

        holder.prepare(user_id, size, model, lambda: tokens.prices(model))

    async def _reserve(self, req: TurnRequest, prompt_tokens: int, budget: int) -> Grant:
        if req.next_turn is not None:
            grant = await req.next_turn.take(req.user_id, prompt_tokens, budget, req.model)
            if grant is not None:
                return grant
        return await metrics.timed_gate(
            self.gate.reserve(
                req.user_id,
                prompt_tokens,
                budget,
                model=req.model,
                prices=tokens.prices(req.model),
                min_completion=self._min_completion(req, budget),
            )
        )

    def _min_completion(self, req: TurnRequest, budget: int) -> int:
        """Fewer answer tokens than this left, and the database refuses (short_answer_only):
        the chat offers the short answer as a choice, unless the user already chose it."""
        return 1 if req.accept_short else max(1, min(budget, SHORT_ANSWER))

    async def _reserve_fitted(
        self, req: TurnRequest, messages: list[dict], prompt_tokens: int, window: int
    ) -> tuple[Grant, list[dict], int, int]:
        """Reserve for the prompt and an answer. If the prompt does not fit the quota left,
        drop the oldest turns until it does, sized from the refusal's own figures, and ask
        once more: the database still decides, atomically (vtai_reserve).

        Returns (grant, messages, prompt_tokens, messages dropped to fit the quota)."""
        budget = min(self._max_tokens(req), window - prompt_tokens)
        grant = await self._reserve(req, reserve_prompt(req.model, messages, prompt_tokens), budget)
        if grant.granted or grant.reason not in PROMPT_REASONS or grant.room is None:
            return grant, messages, prompt_tokens, 0
        if len(messages) < 2:
            return grant, messages, prompt_tokens, 0
        left = grant.room
        fitted, _, dropped = fit_context(
            req.model, messages[:-1], messages[-1], left, reserve_prompt
        )
        if not fitted:
            return grant, messages, prompt_tokens, 0
        counted = count_prompt(req.model, fitted)
        budget = min(self._max_tokens(req), window - counted)
        retry = await metrics.timed_gate(
            self.gate.reserve(
                req.user_id,
                reserve_prompt(req.model, fitted, counted),
                budget,
                model=req.model,
                prices=tokens.prices(req.model),
                min_completion=self._min_completion(req, budget),
            )
        )
        if not retry.granted:
            return retry, messages, prompt_tokens, 0
        return retry, fitted, counted, dropped

    async def drain(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def _max_tokens(self, req: TurnRequest) -> int:
        if req.max_tokens is None:
            return self.settings.max_tokens
        return max(1, min(req.max_tokens, self.settings.max_tokens))

    def _facts(
        self, req: TurnRequest, call_id: str, grant: Grant | None, trimmed: int = 0
    ) -> Facts:
        return Facts(
            call_id=call_id,
            user_id=str(req.user_id),
            session_id=req.session_id,
            model=req.model,
            provider=rows.provider_of(req.model),
            tier=grant.tier if grant else None,
            max_tokens=grant.max_tokens if grant else 0,
            reservation_id=str(grant.reservation_id) if grant and grant.reservation_id else None,
            period_start=grant.period_start.isoformat() if grant and grant.period_start else None,
            trimmed=trimmed,
            source=req.source,
            api_key_id=str(req.api_key_id) if req.api_key_id else None,
        )

    def offered(self) -> list[str]:
        """The models this server runs for a user: the chat's picker list, checked per turn.
        From the process's copy of the catalogue; `refresh_models` reads it again when due."""
        entries = self.catalogue.entries if self.catalogue is not None else None
        return models.available_models(self.settings.model, settings=self.settings, entries=entries)

    def labels(self, offered: list[str]) -> dict[str, str]:
        """The picker's items, label -> model: the catalogue's display name, else the id."""
        items: dict[str, str] = {}
        for model in offered:
            entry = self.catalogue.get(model) if self.catalogue is not None else None
            label = entry.display_name if entry is not None and entry.display_name else model
            items[f"{label} ({model})" if label in items else label] = model
        return items

    async def refresh_models(self) -> None:
        """Read the catalogue again if the process's copy is older than its refresh time."""
        if self.catalogue is not None:
            await self.catalogue.fresh()

    def refuse(self, req: TurnRequest, notice: str, **details) -> TurnOutcome:
        """A request refused before it is a turn (the API's malformed or oversized bodies):
        one row, charged 0, as every refusal of a known user is. Nothing of the body is kept."""
        outcome = self._refuse(req, str(uuid.uuid4()), notice, None, [], **details)
        metrics.turn_ended(req, outcome)
        return outcome

    def _refuse(
        self,
        req: TurnRequest,
        call_id: str,
        notice: str,
        grant: Grant | None,
        messages: list[dict] | None = None,
        **details,
    ) -> TurnOutcome:
        """A turn that never reaches a model: one line for the user and a row, charged 0."""
        if messages is None:
            messages = [] if req.oversize else [{"role": "user", "content": req.text}]
        row = rows.build(
            self._facts(req, call_id, grant),
            "refused",
            self.settings.log_content,
            messages=messages,
            details=details,
        )
        return TurnOutcome(
            "refused",
            notice=notice,
            grant=grant,
            call_id=call_id,
            history=req.history,
            reason=details.get("reason"),
            settled=self._later(row),
        )

    async def _open_stream(self, req: TurnRequest, messages: list[dict], call: OpenCall):
        """The provider's stream, under the retry policy (RETRIES above)."""
        options = {
            "num_retries": 0,
            "max_retries": 0,
            "timeout": self.settings.request_timeout,
            # A catalogued OpenAI-compatible server: its api_base and the named variable's key.
            **models.call_options(self.catalogue.get(req.model) if self.catalogue else None),
            **self.call_options,
        }
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.settings.request_timeout
        attempt = 0
        while True:
            try:
                return await litellm.acompletion(
                    model=req.model,
                    messages=messages,
                    stream=True,
                    stream_options={"include_usage": True},
                    max_tokens=call.facts.max_tokens,
                    litellm_call_id=call.facts.call_id,
                    metadata={META_KEY: call.facts.meta()},
                    **options,
                )
            except Exception as exc:
                attempt += 1
                if (
                    attempt > RETRIES
                    or not is_retryable(exc)
                    or loop.time() + RETRY_DELAY >= give_up
                ):
                    raise
                log.info(
                    "call %s: %s before the answer began; retry %d",
                    call.facts.call_id,
                    type(exc).__name__,
                    attempt,
                )
            await asyncio.sleep(RETRY_DELAY)

    async def run(
        self, req: TurnRequest, on_token: Callable[[str], Awaitable[None]]
    ) -> TurnOutcome:
        """One turn: check the input, fit and reserve, stream the answer, account for it."""
        outcome = None
        try:
            outcome = await self._run(req, on_token)
            return outcome
        finally:
            # None: stopped (cancelled) or an error, told apart by the exception in flight.
            metrics.turn_ended(req, outcome)

    async def _run(
        self, req: TurnRequest, on_token: Callable[[str], Awaitable[None]]
    ) -> TurnOutcome:
        call_id = str(uuid.uuid4())
        await self.refresh_models()
        checked = self._check(req, call_id)
        if isinstance(checked, TurnOutcome):
            return checked
        prepared = await self._prepare(req, call_id, checked)
        if isinstance(prepared, TurnOutcome):
            return prepared
        grant, messages, dropped, notice, prompt_tokens = prepared
        call = self.calls.open(self._facts(req, call_id, grant, dropped))
        streamed = await self._stream(req, call, grant, messages, on_token, prompt_tokens)
        if isinstance(streamed, TurnOutcome):
            return streamed
        reply, usage, finish = streamed
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
            usage={
                "prompt_tokens": usage.prompt,
                "completion_tokens": usage.completion,
                "total_tokens": usage.total,
            }
            if usage
            else {},
            history=history,
            trimmed=dropped,
            finish=finish,
            settled=call.settled,
        )

    def _check(self, req: TurnRequest, call_id: str) -> TurnOutcome | str:
        """The message's text, or the refusal of a message too long, for a model nobody
        offered, or empty: none of these reaches a model."""
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
        return text

    async def _prepare(
        self, req: TurnRequest, call_id: str, text: str
    ) -> TurnOutcome | tuple[Grant, list[dict], int, str | None, int]:
        """Fit the chat to the model's window and the quota left, and reserve for it:
        (grant, messages, oldest messages dropped, notice, count_prompt's figure), or the
        refusal."""
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
        grant, messages, prompt_tokens, over_quota = await self._reserve_fitted(
            req, messages, prompt_tokens, window
        )
        if not grant.granted:
            alone = None
            if grant.reason in PROMPT_REASONS:
                alone = reserve_prompt(req.model, [message])
            return self._refuse(
                req,
                call_id,
                refusal(grant, self.settings.usage_period, req.model, alone),
                grant,
                messages,
                reason=grant.reason,
            )
        dropped += over_quota
        notice = None
        if over_quota:
            notice = (
                f"To fit the tokens you have left this {self.settings.usage_period}, the "
                f"oldest {dropped} messages were left out of this answer."
            )
        elif dropped:
            notice = (
                f"The conversation outgrew {req.model}'s context, so the oldest "
                f"{dropped} messages were left out of this answer."
            )
        return grant, messages, dropped, notice, prompt_tokens

    async def _stream(
        self,
        req: TurnRequest,
        call: OpenCall,
        grant: Grant,
        messages: list[dict],
        on_token: Callable[[str], Awaitable[None]],
        prompt_tokens: int | None = None,
    ) -> TurnOutcome | tuple[str, Tokens | None, str | None]:
        """Call the model and pass its tokens on: (reply, usage, finish reason), or the
        failed turn's outcome. A stop (cancel) is charged and goes on up."""
        parts: list[str] = []
        rid = call.facts.reservation_id
        usage: Tokens | None = None
        finish = None
        stream = None
        # sent: the prompt may have reached the provider, which bills it if it is processed
        # (a stop or a timeout doesn't undo that); a call that fails with an error status
        # before its stream starts was refused by the provider (a bad key, a rate limit, a
        # server error) and is not billed.
        sent = False
        complete = False
        started = asyncio.get_running_loop().time()
        try:
            sent = True
            if rid is not None:
                self._journal_flight(call, messages, prompt_tokens)
            # From the first request to the answer's first chunk: VTAI_REQUEST_TIMEOUT in all.
            async with asyncio.timeout(self.settings.request_timeout) as first_chunk:
                stream = await self._open_stream(req, messages, call)
                async for chunk in stream:
                    first_chunk.reschedule(None)
                    if getattr(chunk, "usage", None):
                        usage = Tokens.from_usage(chunk.usage)
                    if chunk.choices and chunk.choices[0].finish_reason:
                        finish = chunk.choices[0].finish_reason
                    delta = chunk.choices[0].delta.content if chunk.choices else None
                    if delta:
                        parts.append(delta)
                        if rid is not None and len(parts) % STREAMED_EVERY == 0:
                            self.ledger.streamed(rid, len(parts))
                        await on_token(delta)
                    if finish and usage:
                        # The answer and its usage are in (the usage chunk comes last).
                        # LiteLLM's end of stream, which runs its success hooks, comes after
                        # the reply is returned: see _finish_stream.
                        break
            # Synchronously, before LiteLLM's logging worker runs the success hook.
            call.estimated = not any(
                getattr(c, "usage", None) for c in getattr(stream, "chunks", [])
            )
            self._hold_provisional(call, messages, "".join(parts), usage, started)
            complete = True
            self._in_background(self._finish_stream(stream, call))
        except asyncio.CancelledError:
            # A stop or a client gone for good: charge what the provider bills, then let the
            # cancel through.
            self._record_partial(call, messages, parts, usage, None, sent, started)
            raise
        except Exception as exc:
            exc = _as_timeout(exc, req.model, self.settings.request_timeout)
            metrics.provider_error(req.model, exc)
            accepted = stream is not None or isinstance(exc, litellm.Timeout)
            settled = self._record_partial(call, messages, parts, usage, exc, accepted, started)
            self.reserve_ahead(req.next_turn, req.user_id, req.model, req.history)
            return TurnOutcome(
                "failed",
                reply="".join(parts),
                notice=errors.user_message(
                    exc, req.model, self.settings.request_timeout, partial=bool(parts)
                ),
                grant=grant,
                call_id=call.facts.call_id,
                history=req.history,
                settled=settled,
            )
        finally:
            # Stops a local generation at once; a provider stream closes its connection.
            if not complete and stream is not None and hasattr(stream, "aclose"):
                await asyncio.shield(_close(stream))
        return "".join(parts), usage, finish

    def _journal_flight(
        self, call: OpenCall, messages: list[dict], prompt_tokens: int | None
    ) -> None:
        """Before the prompt goes out: the row this turn is charged if its process dies
        before the turn's own row is held (journal recovery then settles the reservation
        with it, plus the tokens streamed by then). Counts only, no content: the chat's
        steps keep what the user saw."""
        model = call.facts.model
        exact = tokens.is_exact(model)
        prompt = prompt_tokens if exact and prompt_tokens is not None else None
        if prompt is None:
            prompt = charged_prompt(model, messages)
        row = rows.build(
            call.facts,
            "failure",
            self.settings.log_content,
            usage=Tokens(prompt, 0, estimated=True),
            error={"class": "ProcessDied", "code": None, "message": PROCESS_DIED},
            details={"aborted": True, "process_died": True, "streamed_tokens": 0},
        )
        self.ledger.in_flight(row, Tokens(0, 1).cost(model))

    def _hold_provisional(
        self,
        call: OpenCall,
        messages: list[dict],
        reply: str,
        usage: Tokens | None,
        started: float,
    ) -> None:
        """Put the answered turn's row on disk until LiteLLM's success hook records the full
        one (and drops this). If the process dies first, or the hook never runs, start-up
        replays this row instead, so an answer that reached the user is always billed, at the
        same price (cached tokens included) as the full row."""
        if usage is None:
            usage = rows.estimate(call.facts.model, messages, reply)
        call.provisional = self.ledger.hold(
            rows.build(
                call.facts,
                "success",
                self.settings.log_content,
                usage=usage,
                messages=messages,
                response=reply,
                response_time=asyncio.get_running_loop().time() - started,
                details={"provisional": True},
            )
        )

    def _record_partial(
        self,
        call: OpenCall,
        messages: list[dict],
        parts: list[str],
        usage: Tokens | None,
        exc: BaseException | None,
        sent: bool,
        started: float,
    ) -> Awaitable | None:
        """The row of a stopped, abandoned or failed call, charged what the provider bills:
        its usage if the stream delivered it, else the prompt if `sent` (billed even when no
        token came) plus the tokens that streamed, counted by the model's tokenizer where it
        runs here (exact) and estimated otherwise."""
        if self.calls.take(call.facts.call_id) is None:
            return None  # its row is written already
        model = call.facts.model
        produced = "".join(parts)
        if usage is None:
            prompt = charged_prompt(model, messages) if sent else 0
            completion = tokens.count_text(model, produced) if produced else 0
            counted = prompt + completion > 0
            usage = Tokens(prompt, completion, estimated=counted and not tokens.is_exact(model))
        row = rows.build(
            call.facts,
            "success" if exc is None else "failure",
            self.settings.log_content,
            usage=usage,
            messages=messages,
            response=produced,
            error=rows.error_info(exc) if exc is not None else None,
            response_time=asyncio.get_running_loop().time() - started,
            details={"aborted": exc is None, "streamed_tokens": usage.completion},
        )
        return self._later(row, call)


def oversize(text: str) -> dict:
    """What a refused message's row keeps of it: its size and a hash, never the text."""
    return {
        "chars": len(text),
        "sha256": hashlib.sha256(text.encode("utf-8", "replace")).hexdigest(),
    }
