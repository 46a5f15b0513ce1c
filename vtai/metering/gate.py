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


@dataclass(frozen=True)
class Grant:
    granted: bool
    # granted | quota_exhausted | prompt_exceeds_quota | unknown_user | unavailable | open,
    # or error: the reserve failed for another reason than an unreachable database
    reason: str
    reservation_id: uuid.UUID | None = None
    max_tokens: int = 0
    tier: str | None = None
    token_limit: int | None = None
    used: int = 0
    reserved: int = 0
    period_start: datetime | None = None
    resets_at: datetime | None = None

    @property
    def remaining(self) -> int | None:
        if self.token_limit is None:
            return None
        return max(self.token_limit - self.used - self.reserved, 0)


@dataclass(frozen=True)
class Usage:
    username: str
    tier: str
    token_limit: int | None
    used: int
    reserved: int
    period_start: datetime
    resets_at: datetime | None

    @property
    def remaining(self) -> int | None:
        if self.token_limit is None:
            return None
        return max(self.token_limit - self.used, 0)


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
    ) -> Grant:
        try:
            row = await self.pool.fetchrow(
                "select * from public.vtai_reserve($1, $2, $3, $4, $5, coalesce($6, now()))",
                user_id,
                prompt_tokens,
                max_completion,
                self.period,
                self.ttl_seconds,
                now,
                timeout=self.timeout,
            )
            return Grant(**dict(row))
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
        return Usage(**dict(row)) if row else None

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
