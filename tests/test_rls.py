"""Row-level security as the real roles: a user sees only their rows, anon sees nothing."""

from __future__ import annotations

import json
import uuid

import asyncpg
import pytest

from tests.conftest import add_user
from vtai.metering.gate import Gate
from vtai.metering.ledger import Ledger
from vtai.metering.spool import Spool


async def as_role(conn, role: str, user_id: uuid.UUID | None = None):
    claims = {"role": role} | ({"sub": str(user_id)} if user_id else {})
    await conn.execute(f"set local role {role}")
    await conn.execute("select set_config('request.jwt.claims', $1, true)", json.dumps(claims))


@pytest.fixture
async def two_users_with_usage(db_url, conn, tmp_path):
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    a, b = await add_user(conn, "alice"), await add_user(conn, "bob")
    ledger = Ledger(pool, Spool(tmp_path))
    for user in (a, b):
        grant = await Gate(pool).reserve(user.id, 10, 10)
        await ledger.record(
            {
                "litellm_call_id": str(uuid.uuid4()),
                "end_user": str(user.id),
                "status": "success",
                "prompt_tokens": 10,
                "completion_tokens": 5,
                "model": "m",
                "reservation_id": str(grant.reservation_id),
                "messages": [{"role": "user", "content": f"private note of {user.username}"}],
            }
        )
    await pool.close()
    return a, b


async def test_user_reads_only_own_rows(conn, two_users_with_usage):
    a, b = two_users_with_usage
    async with conn.transaction():
        await as_role(conn, "authenticated", a.id)
        logs = await conn.fetch("select end_user from request_logs")
        assert [r["end_user"] for r in logs] == [a.id]
        assert [r["end_user"] for r in await conn.fetch("select end_user from usage_counters")] == [
            a.id
        ]
        assert [r["id"] for r in await conn.fetch("select id from profiles")] == [a.id]


@pytest.mark.parametrize(
    "statement",
    [
        "insert into request_logs (litellm_call_id, status, end_user) values ('x', 'success', $1)",
        "update request_logs set total_tokens = 0 where end_user = $1",
        "delete from request_logs where end_user = $1",
        "update usage_counters set used = 0 where end_user = $1",
        "update profiles set tier = 'unlimited' where id = $1",
        "update profiles set is_admin = true where id = $1",
        "select * from vtai_reserve($1, 1, 1)",
        "select vtai_record(jsonb_build_object('litellm_call_id', 'forged', 'end_user', $1::uuid,"
        " 'status', 'success'))",
        "select * from vtai_private.credentials where profile_id = $1",
    ],
)
async def test_user_cannot_change_usage_tier_or_read_passwords(
    conn, two_users_with_usage, statement
):
    a, _ = two_users_with_usage
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with conn.transaction():
            await as_role(conn, "authenticated", a.id)
            await conn.execute(statement, a.id)


@pytest.mark.parametrize(
    "table",
    [
        "request_logs",
        "usage_counters",
        "profiles",
        "tiers",
        "reservations",
        "vtai_private.credentials",
    ],
)
async def test_anon_reads_nothing(conn, two_users_with_usage, table):
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with conn.transaction():
            await as_role(conn, "anon")
            await conn.fetch(f"select * from {table}")


async def test_service_role_sees_all(conn, two_users_with_usage):
    if not await conn.fetchval("select rolbypassrls from pg_roles where rolname='service_role'"):
        pytest.fail("service_role should bypass RLS on a server where migrations ran as superuser")
    async with conn.transaction():
        await as_role(conn, "service_role")
        assert await conn.fetchval("select count(*) from request_logs") == 2
