"""The ledger's store on a direct connection: `vtai_record_batch()` over the app's pool."""

from __future__ import annotations

import asyncpg

from vtai.db.connection import UNAVAILABLE
from vtai.metering.encoding import encode


def is_bad_data(exc: BaseException) -> bool:
    """True when the database rejected the row itself; retrying would fail the same way."""
    return isinstance(
        exc, asyncpg.DataError | asyncpg.IntegrityConstraintViolationError | ValueError
    )


class PostgresStore:
    """The ledger's database: `vtai_record_batch()` over the app's asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool, period: str = "month", timeout: float = 5.0):
        self.pool = pool
        self.period = period
        self.timeout = timeout

    async def record_batch(self, rows: list[dict]) -> list[bool]:
        """One transaction for all rows: True for each row that is new, in order."""
        return await self.record_encoded([encode(row)[1] for row in rows])

    async def record_encoded(self, texts: list[str]) -> list[bool]:
        """record_batch() for rows already encoded by encode()."""
        # The timeout covers waiting for a connection too: a busy or wedged pool must send
        # the rows to the spool, not hold them in memory. Sent as text so the result doesn't
        # depend on the pool's JSON codec.
        async with self.pool.acquire(timeout=self.timeout) as conn:
            result = await conn.fetchval(
                "select public.vtai_record_batch($1::text::jsonb, $2)",
                "[" + ",".join(texts) + "]",
                self.period,
                timeout=self.timeout,
            )
        return list(result)

    @staticmethod
    def is_unavailable(exc: BaseException) -> bool:
        return isinstance(exc, UNAVAILABLE)

    is_bad_data = staticmethod(is_bad_data)
