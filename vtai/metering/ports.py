"""What metering needs from a database, declared once: a direct connection (asyncpg) and
Supabase's REST API (vtai.rest.store) are two implementations of the same calls, and the
rest of the app is written against these, never against either."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from vtai.db.accounts import Profile
    from vtai.metering.gate import Grant, Usage


class UsageGate(Protocol):
    """Reservations and usage: `vtai_reserve`, `vtai_release`, `vtai_usage` and the day
    buckets. The implementations decide only what a failure to reach the database means."""

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
    ) -> Grant: ...

    async def release(self, reservation_id: uuid.UUID, user_id: uuid.UUID) -> bool: ...

    async def usage(self, user_id: uuid.UUID, now: datetime | None = None) -> Usage | None: ...

    async def daily(self, user_id: uuid.UUID, since: datetime) -> list[tuple[datetime, int]]: ...


class LedgerStore(Protocol):
    """Where the ledger's batches go: `vtai_record_batch`, one bool per row (True: new)."""

    async def record_batch(self, rows: list[dict]) -> list[bool]: ...

    async def record_encoded(self, texts: list[str]) -> list[bool]:
        """record_batch() for rows already encoded by vtai.metering.encoding.encode()."""
        ...

    def is_unavailable(self, exc: BaseException) -> bool:
        """The database could not be reached: spool and retry later."""
        ...

    def is_bad_data(self, exc: BaseException) -> bool:
        """The database refused the row itself: retrying would fail the same way."""
        ...


class Profiles(Protocol):
    """Profile reads and first-login creation, for Supabase Auth logins on either path."""

    async def profile(self, user_id: uuid.UUID) -> Profile | None: ...

    async def create_profile(
        self, user_id: uuid.UUID, username: str, tier: str
    ) -> Profile | None: ...
