"""The /admin Keys section: every user's API keys, revoked by an admin, audited as the admin."""

from __future__ import annotations

import uuid

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from tests.admin.test_routes import SECRET, sign_in
from tests.conftest import add_user
from vtai.admin import routes as admin
from vtai.api import keys


@pytest.fixture
async def pool(db_url):
    p = await asyncpg.create_pool(db_url, min_size=1, max_size=4)
    yield p
    await p.close()


@pytest.fixture
async def client(pool, monkeypatch):
    monkeypatch.setenv("CHAINLIT_AUTH_SECRET", SECRET)
    app = FastAPI()
    admin.register(app, get_pool=lambda: pool, get_period=lambda: "month")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


async def test_admin_lists_and_revokes_every_key(client, conn):
    boss = await add_user(conn, "boss", admin=True)
    ada, bob = await add_user(conn, "ada"), await add_user(conn, "bob")
    a, a_plain = await keys.create(conn, ada.id, "ada's laptop", actor="ada")
    b, b_plain = await keys.create(conn, bob.id, "bob's ci", actor="bob")
    await conn.execute(
        "insert into request_logs (litellm_call_id, end_user, status, total_tokens,"
        " counted_tokens, period_start, source, api_key_id)"
        " values ('k1', $1, 'success', 9, 9, vtai_period_start('month', now()), 'api', $2)",
        bob.id,
        b.id,
    )

    sign_in(client, boss)
    r = await client.get("/admin/api/keys")
    assert r.status_code == 200
    rows = {k["id"]: k for k in r.json()["keys"]}
    assert set(rows) == {str(a.id), str(b.id)}
    assert (rows[str(a.id)]["username"], rows[str(a.id)]["prefix"]) == ("ada", a.prefix)
    assert rows[str(b.id)]["tokens"] == 9 and rows[str(b.id)]["state"] == "active"
    assert a_plain[5:] not in r.text and b_plain[5:] not in r.text and "key_hash" not in r.text

    r = await client.post(f"/admin/api/keys/{a.id}/revoke")
    assert r.status_code == 200 and r.json()["changed"]
    assert r.json()["key"]["state"] == "revoked"
    assert (await client.post(f"/admin/api/keys/{uuid.uuid4()}/revoke")).status_code == 404
    assert (await client.post("/admin/api/keys/nope/revoke")).status_code == 400
    trail = await conn.fetchrow("select actor, action, target from audit_log order by id desc")
    assert tuple(trail) == ("boss", "key.revoke", f"ada/{a.prefix}")
    # the audit trail the Plans panel shows has it too
    plans = (await client.get("/admin/api/plans")).json()
    assert plans["audit"][0]["action"] == "key.revoke"

    # cross-origin: refused, nothing revoked
    r = await client.post(
        f"/admin/api/keys/{b.id}/revoke", headers={"Origin": "http://evil.example"}
    )
    assert r.status_code == 403
    assert await conn.fetchval("select revoked_at from api_keys where id = $1", b.id) is None


async def test_non_admins_see_no_keys(client, conn):
    ada = await add_user(conn, "ada")
    bob = await add_user(conn, "bob")
    b, _ = await keys.create(conn, bob.id, "bob's", actor="bob")
    sign_in(client, ada)
    assert (await client.get("/admin/api/keys")).status_code == 403
    assert (await client.post(f"/admin/api/keys/{b.id}/revoke")).status_code == 403
    assert await conn.fetchval("select revoked_at from api_keys") is None


async def test_the_page_has_a_keys_section_loaded_by_its_script():
    page = admin.PAGE.read_text()
    assert 'id="api-keys"' in page and 'id="keys"' in page
    script = (admin.PAGE.parent / "admin.js").read_text()
    assert '"/admin/api/keys"' in script and "loadKeys()" in script
