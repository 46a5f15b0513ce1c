"""A running app (`chainlit run vtai/main.py`, tests/browser.py) and the ledger behind it, for
tests that drive it as clients do (socket.io, `/v1`) and then check Postgres."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from tests.conftest import add_user


class MeteredApp:
    def __init__(self, base: str, db_url: str):
        self.base = base
        self.db_url = db_url

    async def sql(self, query: str, *args):
        conn = await asyncpg.connect(self.db_url)
        try:
            return await conn.fetch(query, *args)
        finally:
            await conn.close()

    async def user_on_plan(self, **plan):
        """(user, tier): a user on a tier of their own, so each test's plan is its own."""
        tier = f"t{uuid.uuid4().hex[:8]}"
        columns = ", ".join(["name", "rank", *plan])
        values = ", ".join(f"${i}" for i in range(1, len(plan) + 3))
        await self.sql(f"insert into tiers ({columns}) values ({values})", tier, 9, *plan.values())
        conn = await asyncpg.connect(self.db_url)
        try:
            return await add_user(conn, tier=tier), tier
        finally:
            await conn.close()

    async def rows(self, user, count: int, timeout: float = 30.0) -> list:
        """The user's ledger rows once there are `count` of them (written off the reply's
        path, so a test waits for them)."""
        async with asyncio.timeout(timeout):
            while True:
                rows = await self.sql(
                    "select * from request_logs where end_user = $1 order by id", user.id
                )
                if len(rows) >= count:
                    return rows
                await asyncio.sleep(0.1)

    async def no_reservations(self, user, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while True:
                if not await self.sql("select 1 from reservations where end_user = $1", user.id):
                    return
                await asyncio.sleep(0.05)

    async def used(self, user) -> int:
        (row,) = await self.sql(
            "select coalesce(sum(used), 0)::bigint as used from usage_counters where end_user = $1",
            user.id,
        )
        return row["used"]

    async def settled(self, user, timeout: float = 30.0) -> int:
        """The user's counted tokens once nothing of theirs is reserved."""
        await self.no_reservations(user, timeout)
        return await self.used(user)

    async def spend(self, user, tokens: int) -> None:
        """Tokens the user spent earlier this period: a ledger row, as a turn would leave."""
        await self.sql(
            "select vtai_record(jsonb_build_object('litellm_call_id', $1::text, 'end_user',"
            " $2::text, 'status', 'success', 'model', 'gpt-4o-mini', 'prompt_tokens', $3::int,"
            " 'completion_tokens', 0))",
            str(uuid.uuid4()),
            str(user.id),
            tokens,
        )
