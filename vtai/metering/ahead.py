"""A chat's reservation for its next turn, taken when the chat opens and after each answer.

The gate's round trip (vtai_reserve) then runs while the user reads and types, not between
their message and the answer. It is an ordinary reservation: made atomically by Postgres,
counted in the user's `reserved`, settled by the turn's ledger row, released when the chat
closes, and given back by its TTL if the process dies. Python decides nothing from a read: a
turn either spends tokens the database set aside for it, or asks for a reservation of its own.

* Size: the chat so far, a typical new message (NEW_MESSAGE tokens) and a whole answer. A
  bigger message releases it and reserves for itself, as every turn did before.
* Kept only while the quota left after it is at least KEEP_FACTOR times its size, so close to
  the limit an idle chat never holds tokens the same user's other chats could use.
* Used only while more than a whole turn's time is left before its TTL, only in the period
  it was reserved in, and only for the model it was reserved for (weights and prices differ).
* Never for a tier with a request rate: vtai_reserve(p_ahead) refuses it (`not_ahead`), since it
  would count a request the user has not made.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from vtai.metering.gate import Grant
from vtai.metering.ports import UsageGate

log = logging.getLogger(__name__)

# Prompt tokens (after the counting margin) set aside for the message not yet typed: about
# 1,000 characters of English. Longer messages reserve for themselves.
NEW_MESSAGE = 320
KEEP_FACTOR = 4
# Seconds of TTL left unused, on top of a whole turn: the app's and the database's clocks.
CLOCK_SLACK = 30.0


@dataclasses.dataclass(frozen=True)
class Held:
    grant: Grant
    user_id: uuid.UUID
    prompt_tokens: int
    model: str
    # time.monotonic() when the request left, before the database stamped its expiry
    asked_at: float

    @property
    def amount(self) -> int:
        return self.prompt_tokens + self.grant.max_tokens


class NextTurn:
    def __init__(
        self,
        gate: UsageGate,
        ttl_seconds: int,
        request_timeout: float,
        clock: Callable[[], float] = time.monotonic,
        live: Callable[[], bool] = lambda: True,
    ):
        """`live()`: plan changes are being heard (vtai.metering.plan_watch); while not, a
        held reservation is given back rather than used."""
        self.gate = gate
        self._live = live
        self.usable_for = ttl_seconds - request_timeout - CLOCK_SLACK
        self._clock = clock
        self._task: asyncio.Task[Held | None] | None = None
        self._spare: set[asyncio.Task] = set()

    def prepare(
        self,
        user_id: uuid.UUID,
        size: Callable[[], tuple[int, int]],
        model: str,
        prices: Callable[[], tuple[float, float] | None],
    ) -> None:
        """Reserve for the next turn in the background; `size()` -> (prompt tokens, answer
        budget), called in the task so that counting stays off the reply's path too."""
        if self.usable_for <= 0:
            return
        self._drop()
        self._task = asyncio.create_task(self._reserve(user_id, size, model, prices))

    async def _reserve(
        self,
        user_id: uuid.UUID,
        size: Callable[[], tuple[int, int]],
        model: str,
        prices: Callable[[], tuple[float, float] | None],
    ) -> Held | None:
        prompt_tokens, budget = size()
        if budget < 1:
            return None
        asked_at = self._clock()
        grant = await self.gate.reserve(
            user_id, prompt_tokens, budget, model=model, prices=prices(), ahead=True
        )
        if not grant.granted or grant.reservation_id is None:
            return None
        held = Held(grant, user_id, prompt_tokens, model, asked_at)
        left = grant.remaining
        if left is not None and left < KEEP_FACTOR * held.amount:
            await self.gate.release(grant.reservation_id, user_id)
            return None
        return held

    async def take(
        self, user_id: uuid.UUID, prompt_tokens: int, budget: int, model: str
    ) -> Grant | None:
        """The held reservation as this turn's grant, if it covers the turn; else None, and it
        is released before the caller reserves (which near the limit could need its tokens)."""
        task, self._task = self._task, None
        if task is None:
            return None
        try:
            # Usually done long ago; if not, it is the round trip this turn would make anyway.
            held = await asyncio.shield(task)
        except asyncio.CancelledError:
            self._task = task
            raise
        except Exception:
            log.exception("reserving ahead failed")
            return None
        if held is None:
            return None
        if (
            self._live()
            and held.user_id == user_id
            and held.model == model
            and self._clock() - held.asked_at < self.usable_for
            and (held.grant.resets_at is None or datetime.now(UTC) < held.grant.resets_at)
            and held.amount >= prompt_tokens + budget
        ):
            return dataclasses.replace(held.grant, max_tokens=budget)
        await self.gate.release(held.grant.reservation_id, held.user_id)
        return None

    async def release(self) -> None:
        """The chat is over: give the tokens back now rather than at the TTL."""
        task, self._task = self._task, None
        if task is not None:
            await self._give_back(task)
        if self._spare:
            await asyncio.gather(*self._spare, return_exceptions=True)

    def drop(self) -> None:
        """The plan changed: what is held was granted under the old one; give it back."""
        self._drop()

    def _drop(self) -> None:
        """A reservation about to be replaced goes back in the background."""
        if self._task is None:
            return
        spare = asyncio.create_task(self._give_back(self._task))
        self._spare.add(spare)
        spare.add_done_callback(self._spare.discard)
        self._task = None

    async def _give_back(self, task: asyncio.Task[Held | None]) -> None:
        try:
            held = await task
        except Exception:
            # It never reserved (take() logs why when a turn asks for it): nothing to give back.
            return
        if held is not None:
            await self.gate.release(held.grant.reservation_id, held.user_id)
