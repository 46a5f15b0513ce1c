"""Login through Supabase Auth: a GoTrue stand-in in front of the real auth.users, profiles
read and created in the real database, directly or over the PostgREST stand-in."""

from __future__ import annotations

import logging

import asyncpg
import pytest

from tests.conftest import add_user
from tests.fake_gotrue import FakeGotrue, add_auth_user
from tests.fake_postgrest import FakePostgrest, token
from vtai.db.accounts import LoginThrottle, PoolProfiles
from vtai.rest import login as supabase_login
from vtai.rest.login import SupabaseAuth
from vtai.rest.store import SupabaseStore

PASSWORD = "correct horse battery"


@pytest.fixture
def gotrue(db_url):
    server = FakeGotrue(db_url).start()
    yield server
    server.stop()


@pytest.fixture
async def auth(gotrue):
    client = await SupabaseAuth.connect(gotrue.url(""), token("anon"))
    yield client
    await client.close()


@pytest.fixture(params=["direct", "rest"])
async def profiles(request, db_url):
    """Where profiles are read and created: the database pool, or PostgREST with the
    service key (REST-only metering)."""
    if request.param == "direct":
        pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
        yield PoolProfiles(pool)
        await pool.close()
        return
    rest = await FakePostgrest(db_url).start()
    store = await SupabaseStore.connect(rest.url, token("service_role"))
    yield store
    await store.close()
    await rest.stop()


async def test_first_login_creates_a_free_profile_under_the_auth_users_id(
    auth, gotrue, profiles, conn
):
    email = await add_auth_user(conn, gotrue, PASSWORD)
    auth_id = await conn.fetchval("select id from auth.users where email = $1", email)

    first = await supabase_login.login(auth, profiles, email.upper(), PASSWORD, LoginThrottle())
    assert (first.id, first.username, first.tier, first.is_admin) == (auth_id, email, "free", False)
    assert await conn.fetchval("select count(*) from vtai_private.credentials") == 0

    # The profile is VT.ai's from then on: what the operator changes is what login reads.
    await conn.execute(
        "update profiles set tier = 'premium', is_admin = true where id = $1", auth_id
    )
    again = await supabase_login.login(auth, profiles, email, PASSWORD)
    assert (again.id, again.tier, again.is_admin) == (auth_id, "premium", True)
    assert await conn.fetchval("select count(*) from profiles where id = $1", auth_id) == 1


async def test_wrong_password_and_unknown_user_get_the_same_refusal_and_the_throttle(
    auth, gotrue, profiles, conn
):
    email = await add_auth_user(conn, gotrue, PASSWORD)
    throttle = LoginThrottle()
    assert await supabase_login.login(auth, profiles, email, "wrong", throttle) is None
    assert await supabase_login.login(auth, profiles, "nobody@example.com", PASSWORD) is None
    assert await supabase_login.login(auth, profiles, email, "", throttle) is None
    for _ in range(2):
        await supabase_login.login(auth, profiles, email, "wrong", throttle)
    assert throttle.delay(email) > 0
    assert await conn.fetchval("select count(*) from profiles") == 0

    assert await supabase_login.login(auth, profiles, email, PASSWORD, throttle) is not None
    assert throttle.delay(email) == 0


@pytest.mark.parametrize("where", ["closed port", "gateway 503"])
async def test_auth_server_down_is_one_log_line_and_no_throttle(gotrue, caplog, where):
    url = "http://127.0.0.1:1" if where == "closed port" else gotrue.url("down")
    auth = await SupabaseAuth.connect(url, token("anon"), timeout=2)
    throttle = LoginThrottle()
    caplog.set_level(logging.INFO, logger="vtai")
    try:
        for _ in range(5):
            assert await supabase_login.login(auth, None, "a@example.com", "pw", throttle) is None
    finally:
        await auth.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 5 and all(r.exc_info is None for r in caplog.records)
    line = errors[0].getMessage()
    assert "Supabase Auth at 127.0.0.1 can't be used" in line and "SUPABASE_URL" in line
    assert "\n" not in line and "pw" not in line.split("(")[0]
    assert throttle.delay("a@example.com") == 0


async def test_a_username_held_by_another_profile_refuses_with_a_log_line(
    auth, gotrue, profiles, conn, caplog
):
    email = await add_auth_user(conn, gotrue, PASSWORD)
    local = await add_user(conn, name=email)
    caplog.set_level(logging.ERROR, logger="vtai")
    assert await supabase_login.login(auth, profiles, email, PASSWORD) is None
    assert "belongs to another profile" in caplog.text
    assert await conn.fetchval("select id from profiles where username = $1", email) == local.id


async def test_profile_service_down_refuses_with_a_log_line(auth, gotrue, conn, caplog):
    email = await add_auth_user(conn, gotrue, PASSWORD)
    store = await SupabaseStore.connect("http://127.0.0.1:1", token("service_role"), timeout=2)
    caplog.set_level(logging.ERROR, logger="vtai")
    try:
        assert await supabase_login.login(auth, store, email, PASSWORD) is None
    finally:
        await store.close()
    assert "profile can't be read or created" in caplog.text
    assert all(r.exc_info is None for r in caplog.records)
    assert PASSWORD not in caplog.text
