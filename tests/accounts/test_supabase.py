"""With Supabase Auth (SUPABASE_URL + SUPABASE_ANON_KEY), through the real running app: sign-up,
reset and password change go to GoTrue, here tests/stand_in_gotrue_accounts.py (a STAND-IN
for GoTrue, not GoTrue), in front of the real auth.users of a real Postgres."""

from __future__ import annotations

import re
import uuid

import asyncpg
import httpx
import pytest

from tests.browser import PASSWORD, running_app
from tests.conftest import create_database, drop_database
from tests.fake_postgrest import token
from tests.stand_in_gotrue_accounts import GotrueAccounts, RestWithAccounts
from vtai.accounts import password, reset, signup

NEW = "a brand new passphrase"


@pytest.fixture(scope="module")
async def app(pg_server, template_db, tmp_path_factory):
    url = await create_database(pg_server, template_db)
    gotrue = GotrueAccounts(url).start()
    env = {
        "VTAI_SIGNUP": "on",
        "SUPABASE_URL": gotrue.url(""),
        "SUPABASE_ANON_KEY": token("anon"),
        "VTAI_TRUSTED_PROXIES": "127.0.0.1/32",
    }
    try:
        async with running_app(url, tmp_path_factory.mktemp("accounts-gotrue"), **env) as base:
            yield base, url, gotrue
    finally:
        gotrue.stop()
        await drop_database(pg_server, url)


@pytest.fixture
async def db(app):
    c = await asyncpg.connect(app[1])
    yield c
    await c.close()


@pytest.fixture
async def http(app):
    addr = f"198.20.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250 + 1}"
    async with httpx.AsyncClient(
        base_url=app[0], timeout=30, headers={"X-Forwarded-For": addr}
    ) as client:
        yield client


def message(r: httpx.Response) -> str:
    found = re.search(r'<p class="msg[^"]*" role="status">([^<]*)</p>', r.text)
    assert found, r.text[:500]
    return found.group(1)


async def login_status(base: str, email: str, password: str) -> int:
    async with httpx.AsyncClient(base_url=base) as client:
        return (
            await client.post("/login", data={"username": email, "password": password})
        ).status_code


def new_email() -> str:
    return f"Sb.{uuid.uuid4().hex[:8]}@Example.com"


async def test_signup_goes_to_gotrue_and_the_user_logs_in_on_the_free_tier(app, http, db):
    base, _, gotrue = app
    email = new_email()
    r = await http.post("/signup", data={"email": email, "password": PASSWORD})
    assert r.status_code == 201 and message(r) == signup.CREATED
    assert (
        "POST",
        "/auth/v1/signup",
        {"email": email.lower(), "redirect_to": base + "/login"},
    ) in gotrue.calls
    # No password of VT.ai's own: it lives in Supabase Auth.
    assert await db.fetchval("select count(*) from vtai_private.credentials") == 0
    assert await login_status(base, email.lower(), PASSWORD) == 200
    profile = await db.fetchrow(
        "select p.tier, p.id = u.id as same from profiles p"
        " join auth.users u on u.email = p.username where p.username = $1",
        email.lower(),
    )
    assert (profile["tier"], profile["same"]) == ("free", True)

    again = await http.post("/signup", data={"email": email.upper(), "password": PASSWORD})
    assert again.status_code == 400 and message(again) == signup.TAKEN


async def test_reset_goes_to_gotrue_and_its_link_sets_the_password_once(app, http, db):
    base, _, gotrue = app
    email = new_email().lower()
    assert (
        await http.post("/signup", data={"email": email, "password": PASSWORD})
    ).status_code == 201
    unknown = await http.post("/reset", data={"email": new_email()})
    r = await http.post("/reset", data={"email": email})
    assert r.status_code == unknown.status_code == 200 and r.text == unknown.text
    assert message(r) == reset.SENT
    (sent,) = [m for m in gotrue.recoveries if m["email"] == email]
    assert sent["redirect_to"] == base + "/reset/confirm"

    form = await http.get("/reset/confirm", params={"token_hash": sent["token_hash"]})
    assert form.status_code == 200 and 'src="/reset/confirm.js"' in form.text
    assert f'value="{sent["token_hash"]}"' in form.text
    data = {"token_hash": sent["token_hash"], "password": NEW, "again": NEW}
    done = await http.post("/reset/confirm", data=data)
    assert done.status_code == 200 and message(done) == reset.DONE
    assert await login_status(base, email, NEW) == 200
    assert await login_status(base, email, PASSWORD) == 401
    again = await http.post("/reset/confirm", data=data)
    assert again.status_code == 400 and message(again) == reset.DEAD


async def test_password_change_goes_to_gotrue_with_the_users_own_token(app, http):
    base, _, gotrue = app
    email = new_email().lower()
    assert (
        await http.post("/signup", data={"email": email, "password": PASSWORD})
    ).status_code == 201
    async with httpx.AsyncClient(base_url=base) as client:
        assert (
            await client.post("/login", data={"username": email, "password": PASSWORD})
        ).status_code == 200
        wrong = await client.post(
            "/account/password", data={"current": "nope nope", "new": NEW, "again": NEW}
        )
        assert wrong.status_code == 400 and message(wrong) == password.WRONG
        done = await client.post(
            "/account/password", data={"current": PASSWORD, "new": NEW, "again": NEW}
        )
        assert done.status_code == 200 and message(done) == password.DONE
        # The old login has ended.
        assert (await client.get("/account/password")).status_code == 303
    assert ("PUT", "/auth/v1/user", {}) in gotrue.calls
    assert await login_status(base, email, NEW) == 200
    assert await login_status(base, email, PASSWORD) == 401


async def test_gotrue_signup_and_reset_are_throttled_like_local_ones(app):
    base, _, gotrue = app
    email = new_email().lower()
    statuses = []
    for i in range(4):
        headers = {"X-Forwarded-For": f"198.21.{i}.{uuid.uuid4().int % 250 + 1}"}
        async with httpx.AsyncClient(base_url=base, headers=headers) as client:
            statuses.append((await client.post("/reset", data={"email": email})).status_code)
    assert statuses == [200, 200, 200, 429]
    assert (
        sum(1 for c in gotrue.calls if c[1] == "/auth/v1/recover" and c[2]["email"] == email) == 3
    )


async def test_the_default_links_fragment_token_sets_the_password(app, http):
    """GoTrue's default recovery link lands with #access_token=...; confirm.js copies it into
    the form, posted here as the script would."""
    base, _, gotrue = app
    email = new_email().lower()
    assert (
        await http.post("/signup", data={"email": email, "password": PASSWORD})
    ).status_code == 201
    async with httpx.AsyncClient(base_url=gotrue.url("").rstrip("/")) as auth:
        session = await auth.post(
            "/auth/v1/token",
            params={"grant_type": "password"},
            json={"email": email, "password": PASSWORD},
        )
    script = await http.get("/reset/confirm.js")
    assert script.status_code == 200 and "access_token" in script.text
    data = {"access_token": session.json()["access_token"], "password": NEW, "again": NEW}
    r = await http.post("/reset/confirm", data=data)
    assert r.status_code == 200 and message(r) == reset.DONE
    assert await login_status(base, email, NEW) == 200
    r = await http.post("/reset/confirm", data={"access_token": "", "password": NEW, "again": NEW})
    assert r.status_code == 400 and message(r) == reset.DEAD


# --- REST-only metering: no database URL, so passwords can only be in Supabase Auth ---------


@pytest.fixture(scope="module")
async def rest_app(pg_server, template_db, tmp_path_factory):
    url = await create_database(pg_server, template_db)
    gotrue = GotrueAccounts(url)  # served by the PostgREST stand-in, as one Supabase URL
    rest = await RestWithAccounts(url, gotrue).start()
    env = {
        "SUPABASE_DB_URL": "",
        "VTAI_SIGNUP": "on",
        "SUPABASE_URL": rest.url,
        "SUPABASE_SERVICE_ROLE_KEY": token("service_role"),
        "SUPABASE_ANON_KEY": token("anon"),
    }
    try:
        async with running_app("", tmp_path_factory.mktemp("accounts-rest"), **env) as base:
            yield base, gotrue
    finally:
        await rest.stop()
        await drop_database(pg_server, url)


async def test_rest_only_signup_reset_and_change_go_to_gotrue(rest_app):
    base, gotrue = rest_app
    email = new_email().lower()
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        r = await http.post("/signup", data={"email": email, "password": PASSWORD})
        assert r.status_code == 201 and message(r) == signup.CREATED
        assert (await http.post("/reset", data={"email": email})).status_code == 200
        assert [m["email"] for m in gotrue.recoveries] == [email]
        assert (
            await http.post("/login", data={"username": email, "password": PASSWORD})
        ).status_code == 200
        data = {"current": PASSWORD, "new": NEW, "again": NEW}
        done = await http.post("/account/password", data=data)
        assert done.status_code == 200 and message(done) == password.DONE
    assert await login_status(base, email, NEW) == 200
