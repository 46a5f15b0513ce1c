"""The probe user: made on first use, put back when changed by hand, never someone else."""

from __future__ import annotations

import asyncpg
import pytest

from tests.conftest import add_user
from vtai.ops import probe


async def test_probe_user_is_made_once_and_put_back_unlimited_disabled_without_password(
    db_url, conn
):
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=1)
    try:
        assert await probe.ensure_user(pool) == probe.PROBE_USER_ID
        # Someone changes it by hand: a tier, enabled, a password.
        await conn.execute(
            "update profiles set tier = 'free', disabled_at = null where id = $1",
            probe.PROBE_USER_ID,
        )
        await conn.execute(
            "insert into vtai_private.credentials (profile_id, password_hash) values ($1, 'x')",
            probe.PROBE_USER_ID,
        )
        assert await probe.ensure_user(pool) == probe.PROBE_USER_ID
    finally:
        await pool.close()
    row = await conn.fetchrow(
        "select count(*) over () as n, tier, disabled_at is not null as disabled,"
        " exists (select 1 from vtai_private.credentials where profile_id = p.id) as password"
        " from profiles p where username = $1",
        probe.PROBE_USERNAME,
    )
    assert dict(row) == {"n": 1, "tier": "unlimited", "disabled": True, "password": False}


async def test_a_person_named_vtai_probe_is_never_used_as_the_probe(db_url, conn):
    await add_user(conn, probe.PROBE_USERNAME)
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=1)
    try:
        with pytest.raises(probe.ProbeError, match="another user is named 'vtai-probe'"):
            await probe.ensure_user(pool)
    finally:
        await pool.close()
    assert await conn.fetchval("select tier from profiles where username = 'vtai-probe'") == "free"
