"""The audit trail (vtai.plans.audit): written inside the change's transaction, append-only for
every role (the table's owner too), readable by admins only."""

from __future__ import annotations

import getpass

import asyncpg
import pytest

from vtai.plans import audit


async def test_record_needs_the_changes_transaction(conn):
    with pytest.raises(RuntimeError, match="inside the transaction"):
        await audit.record(conn, "cli:ops", audit.TIER_SET, "free", None, {"rpm": 1})
    assert await conn.fetchval("select count(*) from audit_log") == 0


async def test_newest_first_with_before_and_after(conn):
    for n in range(3):
        async with conn.transaction():
            await audit.record(conn, "boss", audit.MODEL_WEIGHT, f"m{n}", None, {"weight": n})
    rows = await audit.newest(conn, limit=2)
    assert [r["target"] for r in rows] == ["m2", "m1"]
    assert rows[0]["actor"] == "boss" and rows[0]["action"] == "model.weight"
    assert rows[0]["before"] is None and rows[0]["after"] == {"weight": 2}
    assert rows[0]["at"]


@pytest.mark.parametrize(
    "statement",
    [
        "update audit_log set actor = 'someone else'",
        "update audit_log set after = null",
        "delete from audit_log",
        "truncate audit_log",
    ],
)
async def test_append_only_even_for_the_owner(conn, statement):
    async with conn.transaction():
        await audit.record(conn, "boss", audit.USER_TIER, "bob", {"tier": "free"}, {"tier": "x"})
    owner = await conn.fetchval(
        "select tableowner from pg_tables where schemaname = 'public' and tablename = 'audit_log'"
    )
    assert owner == await conn.fetchval("select current_user")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await conn.execute(statement)
    row = await conn.fetchrow("select actor, after::text as after from audit_log")
    assert (row["actor"], row["after"]) == ("boss", '{"tier": "x"}')


@pytest.mark.parametrize("role", ["anon", "authenticated"])
async def test_only_admins_read_it(conn, role):
    async with conn.transaction():
        await audit.record(conn, "boss", audit.USER_TIER, "bob", None, None)
    for statement in (
        "select * from public.audit_log",
        "insert into public.audit_log (actor, action, target) values ('me', 'x', 'y')",
    ):
        async with conn.transaction():
            await conn.execute(f"set local role {role}")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)


def test_cli_actor_is_the_os_user():
    assert audit.cli_actor() == f"cli:{getpass.getuser()}"
