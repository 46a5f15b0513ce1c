"""The /account page over real HTTP (uvicorn on 127.0.0.1), with Chainlit's real JWTs and a
real Postgres: a user's own keys only, the key shown once, one-line errors, origin checks."""

from __future__ import annotations

import asyncio
import re
import uuid
from types import SimpleNamespace

import asyncpg
import httpx
import pytest
import uvicorn
from chainlit.auth import create_jwt
from chainlit.user import User
from fastapi import FastAPI

from tests.conftest import add_user
from vtai.admin import routes as admin
from vtai.api import account, keys
from vtai.db import accounts

SECRET = "test-secret-" + "y" * 40


@pytest.fixture
async def pool(db_url):
    p = await asyncpg.create_pool(db_url, min_size=1, max_size=4)
    yield p
    await p.close()


async def serve(app: FastAPI):
    """Run `app` with uvicorn on a free port of 127.0.0.1; yields its base URL."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "uvicorn did not start"
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def base_url(pool, monkeypatch):
    monkeypatch.setenv("CHAINLIT_AUTH_SECRET", SECRET)
    app = FastAPI()
    # As vtai/main.py does: /admin's registration brings /account with it.
    admin.register(app, get_pool=lambda: pool, get_period=lambda: "month")
    async for url in serve(app):
        yield url


@pytest.fixture
async def client(base_url):
    async with httpx.AsyncClient(base_url=base_url) as c:
        yield c


def sign_in(client, profile) -> None:
    """Set the cookie Chainlit's /login would set."""
    meta = {"id": str(profile.id), "tier": profile.tier, "is_admin": profile.is_admin}
    client.cookies.set("access_token", create_jwt(User(identifier=profile.username, metadata=meta)))


async def test_anonymous_is_sent_to_login_and_the_api_says_401(client):
    r = await client.get("/account", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert (await client.get("/account/api/keys")).status_code == 401
    assert (await client.post("/account/api/keys", json={"label": "x"})).status_code == 401
    client.cookies.set("access_token", "not-a-jwt")
    assert (await client.get("/account/api/keys")).status_code == 401


async def test_page_is_served_to_any_signed_in_user_without_inline_script(client, conn):
    ada = await add_user(conn, "ada")
    sign_in(client, ada)
    r = await client.get("/account")
    assert r.status_code == 200 and "VT.ai account" in r.text
    assert r.headers["cache-control"] == "no-store"
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", r.text, re.S)
    assert scripts and all("src=" in attrs and not body.strip() for attrs, body in scripts)
    # nor inline event handlers: the app's CSP allows scripts from its own files only
    assert not re.search(r"\son[a-z]+\s*=", r.text)
    for src in re.findall(r'src="/public/([^"]+)"', r.text):
        assert (account.PAGE.parents[1] / src).is_file(), src
    assert (await client.get("/account/")).status_code == 200


async def test_create_list_revoke_and_the_key_shown_once(client, conn):
    ada = await add_user(conn, "ada")
    sign_in(client, ada)
    assert (await client.get("/account/api/keys")).json()["keys"] == []

    r = await client.post("/account/api/keys", json={"label": "laptop", "expires_days": "30"})
    assert r.status_code == 201, r.text
    assert r.headers["cache-control"] == "no-store"
    created = r.json()
    plain = created["secret"]
    assert keys.well_formed(plain) and "shown once" in created["notice"]
    assert created["key"]["prefix"] == plain[:12] and created["key"]["expires_at"]
    assert "key_hash" not in created["key"]

    listed = await client.get("/account/api/keys")
    body = listed.json()
    assert body["username"] == "ada" and body["period"] == "month"
    assert plain[5:] not in listed.text and "key_hash" not in listed.text
    [row] = body["keys"]
    assert (row["label"], row["prefix"], row["state"], row["tokens"]) == (
        "laptop",
        plain[:12],
        "active",
        0,
    )
    assert row["last_used_at"] is None and row["revoked_at"] is None

    # its tokens this period, from the ledger rows made with it
    await conn.execute(
        "insert into request_logs (litellm_call_id, end_user, status, total_tokens,"
        " counted_tokens, period_start, source, api_key_id)"
        " values ('k1', $1, 'success', 40, 80, vtai_period_start('month', now()), 'api', $2)",
        ada.id,
        uuid.UUID(row["id"]),
    )
    assert (await client.get("/account/api/keys")).json()["keys"][0]["tokens"] == 80

    r = await client.post(f"/account/api/keys/{row['id']}/revoke")
    assert r.status_code == 200 and r.json()["changed"] and r.json()["key"]["state"] == "revoked"
    r = await client.post(f"/account/api/keys/{row['id']}/revoke")
    assert r.status_code == 200 and not r.json()["changed"]
    assert (await client.get("/account/api/keys")).json()["keys"][0]["state"] == "revoked"
    actors = await conn.fetch("select actor, action from audit_log order by id")
    assert [(a["actor"], a["action"]) for a in actors] == [
        ("ada", "key.create"),
        ("ada", "key.revoke"),
    ]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "label"),
        ({"label": ""}, "label"),
        ({"label": "x" * 101}, "label"),
        ({"label": ["a"]}, "label"),
        ({"label": "ok", "expires_days": "soon"}, "expires_days"),
        ({"label": "ok", "expires_days": 0}, "expires_days"),
        ({"label": "ok", "expires_days": 99999}, "expires_days"),
        ("not an object", "label"),
    ],
)
async def test_bad_input_is_one_line_naming_the_field(client, conn, body, field):
    ada = await add_user(conn, "ada")
    sign_in(client, ada)
    r = await client.post("/account/api/keys", json=body)
    assert r.status_code == 400
    detail = r.json()["detail"]
    assert isinstance(detail, str) and detail.startswith(f"{field}: ") and "\n" not in detail
    assert await conn.fetchval("select count(*) from api_keys") == 0


async def test_bad_json_and_bad_key_id(client, conn):
    ada = await add_user(conn, "ada")
    sign_in(client, ada)
    r = await client.post(
        "/account/api/keys", content=b"{", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["detail"].startswith("label: ")
    r = await client.post("/account/api/keys/not-a-uuid/revoke")
    assert r.status_code == 400 and r.json()["detail"] == "key: not a key id"


async def test_another_users_key_cant_be_seen_or_revoked(client, conn):
    ada, bob = await add_user(conn, "ada"), await add_user(conn, "bob")
    bobs, _ = await keys.create(conn, bob.id, "bob's", actor="bob")
    sign_in(client, ada)
    assert (await client.get("/account/api/keys")).json()["keys"] == []
    r = await client.post(f"/account/api/keys/{bobs.id}/revoke")
    assert r.status_code == 404
    r = await client.post(f"/account/api/keys/{uuid.uuid4()}/revoke")
    assert r.status_code == 404
    assert await conn.fetchval("select revoked_at from api_keys where id = $1", bobs.id) is None


async def test_cross_origin_post_is_refused(client, conn, base_url):
    ada = await add_user(conn, "ada")
    own, _ = await keys.create(conn, ada.id, "own", actor="ada")
    sign_in(client, ada)
    evil = {"Origin": "http://evil.example"}
    r = await client.post("/account/api/keys", json={"label": "stolen"}, headers=evil)
    assert r.status_code == 403
    r = await client.post(f"/account/api/keys/{own.id}/revoke", headers=evil)
    assert r.status_code == 403
    # another port of the same host is another origin too
    other_port = {"Origin": "http://127.0.0.1:1"}
    r = await client.post("/account/api/keys", json={"label": "stolen"}, headers=other_port)
    assert r.status_code == 403
    assert await conn.fetchval("select count(*) from api_keys") == 1
    assert await conn.fetchval("select revoked_at from api_keys") is None
    # the page's own origin may
    r = await client.post("/account/api/keys", json={"label": "mine"}, headers={"Origin": base_url})
    assert r.status_code == 201


async def test_an_api_key_is_no_login_here(client, conn):
    ada = await add_user(conn, "ada")
    _, plain = await keys.create(conn, ada.id, "k", actor="ada")
    bearer = {"Authorization": f"Bearer {plain}"}
    assert (await client.get("/account/api/keys", headers=bearer)).status_code == 401
    r = await client.post("/account/api/keys", json={"label": "more"}, headers=bearer)
    assert r.status_code == 401
    assert await conn.fetchval("select count(*) from api_keys") == 1


async def test_disabled_or_deleted_user_is_signed_out(client, conn):
    ada = await add_user(conn, "ada")
    sign_in(client, ada)
    assert (await client.get("/account/api/keys")).status_code == 200
    await accounts.set_disabled(conn, "ada", True)
    assert (await client.get("/account/api/keys")).status_code == 401
    await conn.execute("delete from profiles where id = $1", ada.id)
    assert (await client.get("/account/api/keys")).status_code == 401


async def test_rest_only_mode_says_what_to_set(monkeypatch):
    from vtai.ui import chat

    monkeypatch.setattr(chat, "_services", SimpleNamespace(db=None))
    app = FastAPI()
    app.include_router(account.build_router(get_period=lambda: "month"))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        for r in (await c.get("/account"), await c.get("/account/api/keys")):
            assert r.status_code == 503 and "SUPABASE_DB_URL" in r.text
            assert "account page" in r.text


@pytest.mark.browser
async def test_account_page_in_the_real_app(db_url, conn, tmp_path):
    """The real `chainlit run vtai/main.py` in headless Chromium: /account registered with
    /admin, under the app's CSP, session check and origin rule; the key shown once."""
    from tests.browser import browser_page, login, running_app, screenshot

    await add_user(conn, "ada")
    async with running_app(db_url, tmp_path) as base, browser_page() as page:
        problems = []
        page.on(
            "console",
            lambda m: problems.append(m.text) if m.type in ("error", "warning") else None,
        )
        page.on("dialog", lambda d: asyncio.ensure_future(d.accept()))
        await page.goto(base + "/account", wait_until="domcontentloaded")
        await page.wait_for_url("**/login", timeout=15_000)
        await login(page, base, "ada")
        response = await page.goto(base + "/account", wait_until="domcontentloaded")
        assert "script-src 'self'" in response.headers["content-security-policy"]
        await page.wait_for_selector("body[data-loaded=true]", timeout=15_000)
        assert "signed in as ada" in await page.inner_text("#who")

        await page.fill("#create-key [name=label]", "laptop")
        await page.fill("#create-key [name=expires_days]", "30")
        await page.click("#create-key button[type=submit]")
        await page.wait_for_selector("#new-key:not([hidden])", timeout=15_000)
        plain = (await page.inner_text("#new-key-secret")).strip()
        assert keys.well_formed(plain)
        assert "shown once" in await page.inner_text("#new-key-notice")
        await page.wait_for_selector("#keys tbody tr[data-key]", timeout=15_000)
        row = await page.inner_text("#keys tbody tr[data-key]")
        assert "laptop" in row and plain[:12] in row and plain[12:] not in row
        await screenshot(page, "account_new_key")
        stored = await conn.fetchval("select key_hash from api_keys")
        assert stored == keys.hash_key(plain)

        await page.click("#hide-key")
        assert await page.inner_text("#new-key-secret") == ""
        await page.reload(wait_until="domcontentloaded")
        await page.wait_for_selector("body[data-loaded=true]", timeout=15_000)
        assert plain[12:] not in await page.content()

        # bad input: one line naming the field, the field marked
        await page.fill("#create-key [name=label]", "x")
        await page.fill("#create-key [name=expires_days]", "0")
        await page.click("#create-key button[type=submit]")
        await page.wait_for_selector("#message.error", timeout=15_000)
        assert "expires_days: " in await page.inner_text("#message")
        assert await page.locator("#create-key [name=expires_days].invalid").count() == 1

        await page.click("#keys tbody tr[data-key] button.revoke")
        await page.wait_for_selector("#keys tbody tr.state-revoked", timeout=15_000)
        assert await conn.fetchval("select revoked_at from api_keys") is not None
        csp = [p for p in problems if "Content Security Policy" in p]
        assert not csp, csp
