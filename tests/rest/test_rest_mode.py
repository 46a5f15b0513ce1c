"""REST-only metering: Services started with SUPABASE_URL and keys but no database URL.

Real LiteLLM turns (mock_response) are reserved and recorded over RPC through the PostgREST
stand-in into the real database, and users sign in through the GoTrue stand-in.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import httpx
import pytest
from fastapi import FastAPI

from tests.conftest import add_user, make_settings
from tests.fake_gotrue import FakeGotrue, add_auth_user
from tests.fake_postgrest import FakePostgrest, token
from tests.metering.test_turn import collect, request, runner_for, wait_for_rows
from vtai import cli, launch
from vtai.admin import routes as admin
from vtai.metering.spool import Spool
from vtai.rest.store import SupabaseStore
from vtai.services import Services
from vtai.ui import chat, history

PASSWORD = "correct horse battery"


@pytest.fixture
async def gotrue(db_url):
    # Served by the PostgREST stand-in below; this one's own thread is not started.
    return FakeGotrue(db_url)


@pytest.fixture
async def rest(db_url, gotrue):
    server = await FakePostgrest(db_url, auth=gotrue).start()
    yield server
    await server.stop()


def rest_settings(rest, tmp_path, **overrides):
    return make_settings(
        None,
        tmp_path,
        supabase_url=rest.url,
        supabase_service_key=token("service_role"),
        supabase_anon_key=token("anon"),
        **overrides,
    )


@pytest.fixture
async def rest_services(rest, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="vtai")
    s = await Services.start(rest_settings(rest, tmp_path), replay=False)
    yield s
    await s.stop()


async def until(condition, timeout: float = 10.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def sign_in(services, conn, gotrue):
    email = await add_auth_user(conn, gotrue, PASSWORD)
    return await services.authenticate(email, PASSWORD)


async def test_a_turn_is_reserved_and_recorded_over_rest(rest_services, gotrue, conn, caplog):
    s = rest_services
    # The gate is the REST store, behind the journal that lists the reservations it holds.
    assert s.db is None and isinstance(s.gate.gate, SupabaseStore)
    assert s.ledger.store is s.gate.gate
    setup = caplog.get_records("setup")
    off = [r.getMessage() for r in setup if "Supabase REST API" in r.getMessage()]
    assert len(off) == 1 and "chat history, the /admin dashboard" in off[0]
    assert "SUPABASE_DB_URL" in off[0]

    user = await sign_in(s, conn, gotrue)
    assert user.tier == "free"
    outcome, tokens = await collect(
        runner_for(s, mock_response="The quick brown fox."), request(user)
    )
    assert outcome.kind == "answered" and tokens and outcome.grant.reservation_id
    assert await wait_for_rows(conn, 1) == 1
    row = await conn.fetchrow("select * from request_logs")
    assert (row["status"], row["end_user"], row["litellm_call_id"]) == (
        "success",
        user.id,
        outcome.call_id,
    )
    assert row["total_tokens"] > 0
    assert await conn.fetch("select * from vtai_verify_counters()") == []
    assert await conn.fetchval("select reserved from usage_counters") == 0

    usage = await s.gate.usage(user.id)
    assert usage.used == row["total_tokens"]
    days = await s.gate.daily(user.id, usage.period_start)
    assert [tokens for _, tokens in days] == [row["total_tokens"]]
    assert await s.authenticate(user.username, "wrong") is None


async def test_record_batch_answers_a_bool_per_row_in_order(rest_services, gotrue, conn):
    user = await sign_in(rest_services, conn, gotrue)
    store = rest_services.store

    def row(call_id, tokens):
        return {
            "litellm_call_id": call_id,
            "end_user": user.id,
            "status": "success",
            "prompt_tokens": tokens,
            "completion_tokens": 1,
        }

    assert await store.record_batch([]) == []
    assert await store.record_batch([row("a", 5), row("b", 6)]) == [True, True]
    assert await store.record_batch([row("b", 6), row("c", 7), row("c", 7)]) == [
        False,
        True,
        False,
    ]
    assert await conn.fetchval("select used from usage_counters") == 21
    assert await conn.fetch("select * from vtai_verify_counters()") == []


async def test_rest_down_spools_the_row_and_replays_it_when_back(rest, gotrue, tmp_path, conn):
    s = await Services.start(rest_settings(rest, tmp_path, gate_fail_mode="open"), replay=False)
    try:
        user = await sign_in(s, conn, gotrue)
        port = rest.port
        await rest.stop()

        outcome, _ = await collect(
            runner_for(s, mock_response="answered while down"), request(user)
        )
        assert outcome.kind == "answered" and outcome.grant.reason == "open"
        # LiteLLM hands the success hook to its logging worker a moment after the stream ends.
        assert await until(lambda: s.ledger.spool.status().waiting == 1)

        await rest.start(port=port)
        result = await s.ledger.replayer.replay()
        assert result.recorded == 1
        assert await wait_for_rows(conn, 1) == 1
        assert await conn.fetchval("select litellm_call_id from request_logs") == outcome.call_id
        assert await conn.fetch("select * from vtai_verify_counters()") == []
        assert s.ledger.spool.status().waiting == 0
    finally:
        await s.stop()


async def test_a_turn_over_the_limit_is_refused_over_rpc(rest_services, gotrue, conn):
    user = await sign_in(rest_services, conn, gotrue)
    await conn.execute("update tiers set token_limit = 5 where name = 'free'")
    runner = runner_for(rest_services, mock_response="never sent")
    outcome, tokens = await collect(runner, request(user))
    assert outcome.kind == "refused" and not tokens
    assert outcome.grant.reason == "prompt_exceeds_quota" and "of 5 tokens" in outcome.notice
    await runner.drain()
    r = await conn.fetchrow("select status, total_tokens from request_logs")
    assert (r["status"], r["total_tokens"]) == ("refused", 0)
    assert await conn.fetchval("select used + reserved from usage_counters") == 0


async def test_direct_database_url_wins_and_logins_still_go_to_supabase_auth(
    rest, gotrue, db_url, tmp_path, conn
):
    settings = rest_settings(rest, tmp_path)
    s = await Services.start(
        make_settings(
            db_url,
            tmp_path,
            supabase_url=settings.supabase_url,
            supabase_service_key=settings.supabase_service_key,
            supabase_anon_key=settings.supabase_anon_key,
        ),
        replay=False,
    )
    try:
        assert s.db is not None and s.store is None and not s.settings.rest_metering
        user = await sign_in(s, conn, gotrue)
        assert user is not None and user.tier == "free"
        assert await conn.fetchval("select id from auth.users where email = $1", user.username) == (
            user.id
        )
    finally:
        await s.stop()


@pytest.fixture
def rest_env(rest, tmp_path, monkeypatch):
    """The environment of a REST-only deployment, for the `vtai` command."""
    monkeypatch.setattr("vtai.settings.load_dotenv", lambda **_: None)
    for name in ("VTAI_DATABASE_URL", "SUPABASE_DB_URL", "SUPABASE_SERVICE_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SUPABASE_URL", rest.url)
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", token("service_role"))
    monkeypatch.setenv("SUPABASE_ANON_KEY", token("anon"))
    monkeypatch.setenv("VTAI_DATA_DIR", str(tmp_path))
    return tmp_path


async def test_cli_user_commands_say_what_to_set_and_spool_replay_goes_over_rest(
    rest_env, conn, capsys
):
    for argv in (["user", "list"], ["usage", "--verify"], ["balances", "sync"]):
        code = await asyncio.to_thread(cli.main, argv)
        _, err = capsys.readouterr()
        assert code == 2 and err.count("\n") == 1 and "set SUPABASE_DB_URL" in err, err
    assert not (rest_env / "pg").exists()  # no embedded database started behind the operator

    user = await add_user(conn)
    call_id = f"spooled-{uuid.uuid4()}"
    Spool(rest_env / "spool").append(
        {
            "litellm_call_id": call_id,
            "end_user": str(user.id),
            "status": "success",
            "prompt_tokens": 3,
            "completion_tokens": 4,
        }
    )
    code = await asyncio.to_thread(cli.main, ["spool", "replay"])
    out, err = capsys.readouterr()
    assert code == 0 and "replayed 1 row(s)" in out, err
    assert await conn.fetchval("select total_tokens from request_logs") == 7
    assert await conn.fetch("select * from vtai_verify_counters()") == []


async def test_admin_and_history_are_off_with_a_message(rest_services, monkeypatch):
    monkeypatch.setattr(chat, "_services", rest_services)
    assert history.data_layer(rest_services) is None
    app = FastAPI()
    admin.register(app)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://vtai") as client:
        page = await client.get("/admin")
        api = await client.get("/admin/api/summary")
    assert page.status_code == 503 and "set SUPABASE_DB_URL" in page.text
    assert api.status_code == 503 and "set SUPABASE_DB_URL" in api.json()["detail"]


async def test_launch_prepares_no_database_for_rest_and_no_local_admin_for_supabase_auth(
    rest, db_url, tmp_path, conn
):
    settings = rest_settings(rest, tmp_path)
    assert await launch.prepare(settings) == (None, None)
    direct = make_settings(db_url, tmp_path, supabase_url=rest.url, supabase_anon_key=token("anon"))
    db, password = await launch.prepare(direct)
    await db.close()
    assert password is None
    assert await conn.fetchval("select count(*) from profiles") == 0


async def test_login_sessions_and_throttle_work_over_rest(rest_services, gotrue, conn):
    """REST-only mode: the same session and throttle functions, through the PostgREST
    stand-in as the service role, so logins can be ended and guesses throttled there too."""
    from vtai.web import sessions

    store = sessions.store_of(rest_services)
    assert isinstance(store, sessions.RestSessions)
    profile = await sign_in(rest_services, conn, gotrue)
    assert profile is not None
    sid = await store.start(profile.id, 60)
    assert await store.live(sid, profile.id)
    assert not await store.live(sid, uuid.uuid4())  # a session is its own user's only
    assert await store.end(sid) and not await store.live(sid, profile.id)
    # Guessing one name: free attempts first, then each waits for a slot.
    waits = [await store.attempt("victim@example.com", "203.0.113.9") for _ in range(6)]
    assert waits[:3] == [0.0, 0.0, 0.0] and all(w != 0 for w in waits[3:])
    assert await conn.fetchval("select count(*) from vtai_private.login_throttle") >= 2
