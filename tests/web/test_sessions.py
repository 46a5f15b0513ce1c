"""Sessions can be ended: an old cookie is refused after logout, a password change,
`vtai user logout` and `vtai user disable`, over HTTP and socket.io, against the real server."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest
import socketio

from tests.browser import PASSWORD, running_app
from tests.chainlit_client import ChatClient, login
from tests.conftest import add_user, create_database, drop_database
from vtai.web import sessions

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
async def app(pg_server, template_db, tmp_path_factory):
    url = await create_database(pg_server, template_db)
    data_dir = tmp_path_factory.mktemp("sessions-app")
    try:
        async with running_app(url, data_dir, VTAI_SESSION_TTL="3600") as base:
            yield base, url
    finally:
        await drop_database(pg_server, url)


@pytest.fixture
async def db(app):
    c = await asyncpg.connect(app[1])
    yield c
    await c.close()


def vtai(db_url: str, *argv: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, VTAI_DATABASE_URL=db_url)
    return subprocess.run(
        [str(ROOT / ".venv" / "bin" / "vtai"), *argv],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


async def get_user(base: str, token: str, bearer: bool = False) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if bearer else {}
    cookies = {} if bearer else {"access_token": token}
    async with httpx.AsyncClient(base_url=base, cookies=cookies) as http:
        return await http.get("/user", headers=headers)


async def socket_refused(base: str, token: str) -> bool:
    client = ChatClient(base, token)
    try:
        await client.connect(wait_started=False)
    except socketio.exceptions.ConnectionError:
        return True
    await client.close()
    return False


def watch_disconnect(client: ChatClient) -> asyncio.Event:
    gone = asyncio.Event()

    @client.sio.on("disconnect")
    async def _(*_args):
        gone.set()

    return gone


async def assert_refused(base: str, token: str) -> None:
    r = await get_user(base, token)
    assert r.status_code == 401, r.text
    assert "access_token=" in r.headers.get("set-cookie", "")  # the browser drops it
    assert (await get_user(base, token, bearer=True)).status_code == 401
    assert await socket_refused(base, token)


async def assert_live(base: str, token: str) -> None:
    assert (await get_user(base, token)).status_code == 200
    assert not await socket_refused(base, token)


async def test_login_puts_a_live_server_session_in_the_cookie(app, db):
    base, _ = app
    user = await add_user(db, f"s{uuid.uuid4().hex[:6]}")
    token = await login(base, user.username, PASSWORD)
    session_id, user_id = sessions._claims_unverified(token)
    assert user_id == user.id
    row = await db.fetchrow(
        "select user_id, expires_at - created_at as ttl, revoked_at"
        " from vtai_private.login_sessions where id = $1",
        session_id,
    )
    assert row["user_id"] == user.id and row["revoked_at"] is None
    assert row["ttl"].total_seconds() == pytest.approx(3600, abs=5)  # VTAI_SESSION_TTL
    await assert_live(base, token)


async def test_old_cookie_refused_after_logout(app, db):
    base, _ = app
    user = await add_user(db, f"s{uuid.uuid4().hex[:6]}", admin=True)
    token = await login(base, user.username, PASSWORD)
    other = await login(base, user.username, PASSWORD)  # a second browser
    async with httpx.AsyncClient(base_url=base, cookies={"access_token": token}) as http:
        assert (await http.get("/admin/api/users")).status_code == 200
    open_chat = ChatClient(base, token)
    await open_chat.connect()
    gone = watch_disconnect(open_chat)

    async with httpx.AsyncClient(base_url=base, cookies={"access_token": token}) as http:
        assert (await http.post("/logout")).status_code == 200

    await assert_refused(base, token)
    async with httpx.AsyncClient(base_url=base, cookies={"access_token": token}) as http:
        # The admin routes decode the JWT themselves: the middleware is ahead of them.
        assert (await http.get("/admin/api/users")).status_code == 401
        # Pages still load (as for a visitor), so the browser gets to the login page.
        page = await http.get("/login")
        assert page.status_code == 200 and "access_token=" in page.headers["set-cookie"]
    # The socket that was open when the user logged out is closed, and sends nothing more.
    await asyncio.wait_for(gone.wait(), 10)
    await open_chat.close()
    # Only that login ended.
    await assert_live(base, other)


async def test_event_on_open_socket_after_session_ended_elsewhere_is_dropped(app, db):
    base, url = app
    user = await add_user(db, f"s{uuid.uuid4().hex[:6]}")
    token = await login(base, user.username, PASSWORD)
    chat = ChatClient(base, token)
    await chat.connect()
    gone = watch_disconnect(chat)
    # Ended from another process (the CLI): this server learns it on the next event.
    assert vtai(url, "user", "logout", user.username).returncode == 0
    mark = await chat.send_raw("hello")
    await asyncio.wait_for(gone.wait(), 10)
    assert not any(e in ("new_message", "stream_start") for e, _ in chat.events[mark:])
    await chat.close()
    assert await db.fetchval("select count(*) from request_logs where end_user = $1", user.id) == 0


async def test_old_cookie_refused_after_password_change(app, db):
    base, url = app
    user = await add_user(db, f"s{uuid.uuid4().hex[:6]}")
    token = await login(base, user.username, PASSWORD)
    await assert_live(base, token)
    done = vtai(url, "user", "password", user.username, "--password-stdin", stdin="new pw 123\n")
    assert done.returncode == 0, done.stderr
    assert "1 login ended" in done.stdout
    await assert_refused(base, token)
    await assert_live(base, await login(base, user.username, "new pw 123"))


async def test_old_cookie_refused_after_vtai_user_logout(app, db):
    base, url = app
    user = await add_user(db, f"s{uuid.uuid4().hex[:6]}")
    tokens = [await login(base, user.username, PASSWORD) for _ in range(2)]
    done = vtai(url, "user", "logout", user.username)
    assert done.returncode == 0 and "2 logins ended" in done.stdout, done
    for token in tokens:
        await assert_refused(base, token)
    await assert_live(base, await login(base, user.username, PASSWORD))


async def test_disabled_user_cannot_log_in_until_enabled(app, db):
    base, url = app
    user = await add_user(db, f"s{uuid.uuid4().hex[:6]}")
    token = await login(base, user.username, PASSWORD)
    done = vtai(url, "user", "disable", user.username)
    assert done.returncode == 0 and "disabled" in done.stdout, done
    await assert_refused(base, token)
    async with httpx.AsyncClient(base_url=base) as http:
        r = await http.post("/login", data={"username": user.username, "password": PASSWORD})
        unknown = await http.post("/login", data={"username": "nobody-x", "password": PASSWORD})
    # Refused exactly as an unknown name is.
    assert r.status_code == unknown.status_code == 401 and r.json() == unknown.json()
    assert "disabled" in vtai(url, "user", "list").stdout
    assert vtai(url, "user", "enable", user.username).returncode == 0
    await assert_live(base, await login(base, user.username, PASSWORD))
    # Enabling does not bring the old login back.
    assert (await get_user(base, token)).status_code == 401


async def test_expired_session_is_refused(app, db):
    base, _ = app
    user = await add_user(db, f"s{uuid.uuid4().hex[:6]}")
    token = await login(base, user.username, PASSWORD)
    session_id, _ = sessions._claims_unverified(token)
    await db.execute(
        "update vtai_private.login_sessions set expires_at = now() - interval '1 second'"
        " where id = $1",
        session_id,
    )
    await assert_refused(base, token)


async def test_cookie_lifetime_is_the_session_ttl(app, db):
    base, _ = app
    user = await add_user(db, f"s{uuid.uuid4().hex[:6]}")
    async with httpx.AsyncClient(base_url=base) as http:
        r = await http.post("/login", data={"username": user.username, "password": PASSWORD})
    assert "Max-Age=3600" in r.headers["set-cookie"]
    claims = sessions._jwt_unverified(http.cookies["access_token"])
    assert claims["exp"] - claims["iat"] == pytest.approx(3600, abs=5)


async def test_token_without_a_session_is_refused(app, db):
    """A validly signed token minted without a server session (e.g. before this change)."""
    import jwt

    base, _ = app
    user = await add_user(db, f"s{uuid.uuid4().hex[:6]}")
    forged = jwt.encode(
        {
            "identifier": user.username,
            "metadata": {"id": str(user.id), "tier": "free", "is_admin": False},
            "exp": 4102444800,
        },
        "test-secret-" + "x" * 40,  # tests.browser's CHAINLIT_AUTH_SECRET
        algorithm="HS256",
    )
    await assert_refused(base, forged)


def test_client_address_trusts_forwarded_for_only_from_trusted_proxies():
    import ipaddress

    trusted = (ipaddress.ip_network("10.0.0.0/8"),)

    def scope(peer, xff=None):
        headers = [(b"x-forwarded-for", xff.encode())] if xff else []
        return {"client": (peer, 1234), "headers": headers}

    assert sessions.request_address(scope("203.0.113.9", "1.2.3.4"), trusted) == "203.0.113.9"
    assert sessions.request_address(scope("10.0.0.2", "1.2.3.4"), trusted) == "1.2.3.4"
    # The client can put anything to the left; the first untrusted hop from the right counts.
    assert (
        sessions.request_address(scope("10.0.0.2", "6.6.6.6, 1.2.3.4, 10.0.0.7"), trusted)
        == "1.2.3.4"
    )
    assert sessions.request_address(scope("10.0.0.2", "garbage"), trusted) == "10.0.0.2"
    assert sessions.request_address(scope("::ffff:1.2.3.4"), ()) == "1.2.3.4"
