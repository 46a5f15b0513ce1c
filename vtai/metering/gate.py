"""The gate: reserve tokens against the user's tier limit before a model call.

All arithmetic happens in `vtai_reserve()` (supabase/migrations/*_baseline.sql), in one
statement; this module only calls it and decides what to do when the database is down.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from vtai.db.connection import UNAVAILABLE

log = logging.getLogger(__name__)


# Refusals for quota: the cap they name (vtai.ui.quota words them and offers a way through).
QUOTA_REASONS = frozenset(
    {
        "quota_exhausted",
        "prompt_exceeds_quota",
        "daily_exhausted",
        "prompt_exceeds_daily",
        "usd_exhausted",
        "prompt_exceeds_usd",
    }
)
# A cap leaves fewer answer tokens than the turn asked to start with (Grant.max_tokens says
# how many): the chat offers the short answer as a choice.
SHORT_ANSWER_ONLY = "short_answer_only"
# Refusals whose prompt did not fit what is left: a shorter chat might.
PROMPT_REASONS = frozenset({"prompt_exceeds_quota", "prompt_exceeds_daily", "prompt_exceeds_usd"})


@dataclass(frozen=True)
class Grant:
    granted: bool
    # granted | model_not_allowed | rate_limited | not_ahead | price_unknown | one of
    # QUOTA_REASONS | unknown_user | unavailable | open, or error: the reserve failed for
    # another reason than an unreachable database
    reason: str
    reservation_id: uuid.UUID | None = None
    max_tokens: int = 0
    tier: str | None = None
    token_limit: int | None = None
    used: int = 0
    reserved: int = 0
    period_start: datetime | None = None
    # granted: when the period ends; refused: when the cap that refused resets
    resets_at: datetime | None = None
    # the model's weight (counted tokens per token) and the plan's other caps
    weight: float | None = None
    daily_limit: int | None = None
    daily_used: int = 0
    usd_limit: float | None = None
    usd_used: float = 0.0
    rpm: int | None = None
    # granted: counted tokens left under the tightest token cap after this reservation
    tokens_left: int | None = None

    @property
    def remaining(self) -> int | None:
        """Counted tokens left for the period (granted: under the tightest token cap)."""
        if self.granted and self.tokens_left is not None:
            return max(self.tokens_left, 0)
        if self.token_limit is None:
            return None
        return max(self.token_limit - self.used - self.reserved, 0)

    @property
    def room(self) -> int | None:
        """Raw tokens of prompt and answer the cap that refused still allows (None: no
        token cap applies): what a shorter chat or a shorter answer must fit in."""
        weight = self.weight if self.weight else 1.0
        if self.reason == "prompt_exceeds_daily" and self.daily_limit is not None:
            left = self.daily_limit - self.daily_used
        elif self.reason == "prompt_exceeds_usd":
            return None
        else:
            left = self.remaining
        return None if left is None else max(int(left / weight), 0)


def grant_of(row) -> Grant:
    """A vtai_reserve() row as a Grant (numerics as floats)."""
    data = dict(row)
    for key in ("weight", "usd_limit", "usd_used"):
        if data.get(key) is not None:
            data[key] = float(data[key])
    return Grant(**data)


@dataclass(frozen=True)
class Usage:
    username: str
    tier: str
    token_limit: int | None
    used: int
    reserved: int
    period_start: datetime
    resets_at: datetime | None
    daily_limit: int | None = None
    daily_used: int = 0
    day_resets_at: datetime | None = None
    usd_limit: float | None = None
    usd_used: float = 0.0
    rpm: int | None = None
    models: tuple[str, ...] = ("*",)
    # Top-up tokens left in live grants (on top of token_limit), and the earliest expiry.
    topup_left: int = 0
    topup_until: datetime | None = None

    @property
    def remaining(self) -> int | None:
        if self.token_limit is None:
            return None
        return max(self.token_limit - self.used, 0) + self.topup_left


def usage_of(row) -> Usage:
    """A vtai_usage() row as a Usage."""
    data = dict(row)
    for key in ("usd_limit", "usd_used"):
        if data.get(key) is not None:
            data[key] = float(data[key])
    data["models"] = tuple(data.get("models") or ())
    data["topup_left"] = int(data.get("topup_left") or 0)
    return Usage(**data)


def is_unavailable(exc: BaseException) -> bool:
    return isinstance(exc, UNAVAILABLE)


def when_unavailable(
    exc: BaseException,
    fail_mode: str,
    max_completion: int,
    unavailable: Callable[[BaseException], bool] = is_unavailable,
) -> Grant:
    """A reserve that raised, as a grant, never a crash. Only a usage service that can't be
    reached (`unavailable`: connection errors, timeouts) follows VTAI_GATE_FAIL_MODE: closed
    refuses, open answers and is charged when the spooled row is replayed. Anything else is a
    fault (a bug, a schema that doesn't match, a bad answer): the turn is refused whatever the
    fail mode, and the error is logged with its traceback."""
    if not unavailable(exc):
        log.error("usage gate failed; the turn is refused", exc_info=exc)
        return Grant(False, "error")
    log.warning("usage service unavailable (%s); gate is %s", type(exc).__name__, fail_mode)
    if fail_mode == "open":
        return Grant(True, "open", max_tokens=max_completion)
    return Grant(False, "unavailable")


class Gate:
    def __init__(
        self,
        pool: asyncpg.Pool,
        period: str = "month",
        ttl_seconds: int = 900,
        fail_mode: str = "closed",
        timeout: float = 5.0,
    ):
        self.pool = pool
        self.period = period
        self.ttl_seconds = ttl_seconds
        self.fail_mode = fail_mode
        self.timeout = timeout

    async def reserve(
        self,
        user_id: uuid.UUID,
        prompt_tokens: int,
        max_completion: int,
        now: datetime | None = None,
        *,
        model: str | None = None,
        prices: tuple[float, float] | None = None,
        ahead: bool = False,
        min_completion: int = 1,
    ) -> Grant:
        """Reserve for a call to `model`; `prices`: USD per prompt and completion token (None:
        unknown, refused under a dollar cap); `ahead`: before the user asked (ahead.py);
        `min_completion`: fewer answer tokens than this left is refused (`short_answer_only`,
        the answer there would be in max_tokens) before anything counts."""
        price_in, price_out = prices if prices is not None else (None, None)
        try:
            row = await self.pool.fetchrow(
                "select * from public.vtai_reserve($1, $2, $3, $4, $5, coalesce($6, now()),"
                " $7, $8::float8::numeric, $9::float8::numeric, $10, $11)",
                user_id,
                prompt_tokens,
                max_completion,
                self.period,
                self.ttl_seconds,
                now,
                model,
                price_in,
                price_out,
                ahead,
                min_completion,
                timeout=self.timeout,
            )
            return grant_of(row)
        except Exception as exc:
            return when_unavailable(exc, self.fail_mode, max_completion)

    async def release(self, reservation_id: uuid.UUID, user_id: uuid.UUID) -> bool:
        """Give back a reservation no turn will use; if this fails, its TTL gives it back."""
        try:
            return await self.pool.fetchval(
                "select public.vtai_release($1, $2)",
                reservation_id,
                user_id,
                timeout=self.timeout,
            )
        except Exception as exc:
            log.warning("releasing a reservation failed (%s); it expires", type(exc).__name__)
            return False

    async def usage(self, user_id: uuid.UUID, now: datetime | None = None) -> Usage | None:
        row = await self.pool.fetchrow(
            "select * from public.vtai_usage($1, $2, coalesce($3, now()))",
            user_id,
            self.period,
            now,
            timeout=self.timeout,
        )
        return usage_of(row) if row else None

    async def daily(self, user_id: uuid.UUID, since: datetime) -> list[tuple[datetime, int]]:
        """Tokens per UTC day from `since`, read from the day buckets (never the ledger)."""
        rows = await self.pool.fetch(
            "select bucket_start, sum(total_tokens)::bigint as tokens"
            " from public.usage_aggregates where end_user = $1 and granularity = 'day'"
            " and bucket_start >= $2 group by bucket_start order by bucket_start",
            user_id,
            since,
            timeout=self.timeout,
        )
        return [(r["bucket_start"], r["tokens"]) for r in rows]
