"""The supabase-client metering path, against the real SQL behind a PostgREST stand-in."""

from __future__ import annotations

import uuid

import pytest
from postgrest.exceptions import APIError

from tests.conftest import add_user
from tests.fake_postgrest import FakePostgrest, token
from vtai.rest.store import SupabaseStore


@pytest.fixture
async def rest(db_url):
    server = await FakePostgrest(db_url).start()
    yield server
    await server.stop()


async def store_as(rest, role: str, **kwargs) -> SupabaseStore:
    return await SupabaseStore.connect(rest.url, token(role), **kwargs)


async def test_reserve_record_usage_with_service_role(rest, conn):
    user = await add_user(conn, tier="free")
    store = await store_as(rest, "service_role")
    try:
        grant = await store.reserve(user.id, 100, 50)
        assert grant.granted and grant.reason == "granted"
        assert isinstance(grant.reservation_id, uuid.UUID)
        assert (grant.max_tokens, grant.token_limit, grant.reserved) == (50, 10_000, 150)
        assert grant.period_start.tzinfo is not None

        row = {
            "litellm_call_id": f"rest-{uuid.uuid4()}",
            "end_user": user.id,
            "reservation_id": grant.reservation_id,
            "status": "success",
            "model": "m",
            "prompt_tokens": 100,
            "completion_tokens": 20,
            "messages": [{"role": "user", "content": "hi \x00 there"}],
        }
        assert await store.record(row) is True
        assert await store.record(row) is False  # a replay never charges twice

        usage = await store.usage(user.id)
        assert (usage.username, usage.used, usage.reserved) == (user.username, 120, 0)
        assert await store.usage(uuid.uuid4()) is None
        assert await conn.fetch("select * from vtai_verify_counters()") == []

        refused = await store.reserve(user.id, 20_000, 10)
        assert (refused.granted, refused.reason) == (False, "prompt_exceeds_quota")
    finally:
        await store.close()


async def test_release_over_rpc_gives_the_tokens_back_once(rest, conn):
    user = await add_user(conn)
    store = await store_as(rest, "service_role")
    anon = await store_as(rest, "anon")
    try:
        grant = await store.reserve(user.id, 100, 50)
        assert await store.release(grant.reservation_id, user.id) is True
        assert await store.release(grant.reservation_id, user.id) is False
        assert await conn.fetchval("select reserved from usage_counters") == 0
        # A user-level key can't give back anybody's reservation.
        grant = await store.reserve(user.id, 10, 10)
        assert await anon.release(grant.reservation_id, user.id) is False
        assert await conn.fetchval("select reserved from usage_counters") == 20
    finally:
        await store.close()
        await anon.close()


@pytest.mark.parametrize("role", ["anon", "authenticated"])
async def test_user_level_keys_are_refused_by_the_grants(rest, conn, role):
    user = await add_user(conn)
    store = await store_as(rest, role, fail_mode="open")
    try:
        with pytest.raises(APIError) as err:
            await store.record(
                {"litellm_call_id": "forged", "end_user": user.id, "status": "success"}
            )
        assert err.value.code == "42501"
        with pytest.raises(APIError):
            await store.usage(user.id)
        # A key the database refuses is a misconfiguration, not an outage: the turn is
        # refused whatever the fail mode, and the error is logged.
        grant = await store.reserve(user.id, 1, 1)
        assert not grant.granted and grant.reason == "error"
    finally:
        await store.close()
    assert await conn.fetchval("select count(*) from request_logs") == 0


async def test_forged_token_is_rejected(rest, conn):
    user = await add_user(conn)
    store = await SupabaseStore.connect(rest.url, token("service_role", secret="x" * 40))
    try:
        assert (await store.reserve(user.id, 1, 1)).reason == "error"
        with pytest.raises(APIError) as err:
            await store.record({"litellm_call_id": "x", "end_user": user.id, "status": "success"})
        assert err.value.code == "PGRST301"
    finally:
        await store.close()


async def test_unreachable_service_follows_the_fail_mode(conn):
    user = await add_user(conn)
    store = await SupabaseStore.connect("http://127.0.0.1:1", token("service_role"), timeout=2)
    try:
        assert (await store.reserve(user.id, 1, 1)).reason == "unavailable"
    finally:
        await store.close()
