"""With VTAI_SIGNUP unset and no SMTP settings, through the real running app: sign-up is 404
and reset says which variables turn it on, in one line each; password change still works."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.browser import PASSWORD, running_app
from tests.conftest import add_user, create_database, drop_database
from vtai.accounts import mail, password, signup


@pytest.fixture(scope="module")
async def app(pg_server, template_db, tmp_path_factory):
    url = await create_database(pg_server, template_db)
    env = {"VTAI_SIGNUP": "", "VTAI_SMTP_HOST": "", "VTAI_SMTP_FROM": ""}
    try:
        async with running_app(url, tmp_path_factory.mktemp("accounts-off"), **env) as base:
            yield base, url
    finally:
        await drop_database(pg_server, url)


def message(r: httpx.Response) -> str:
    found = re.search(r'<p class="msg[^"]*" role="status">([^<]*)</p>', r.text)
    assert found, r.text[:500]
    return found.group(1)


async def test_signup_off_is_404_with_one_line(app, conn_app):
    async with httpx.AsyncClient(base_url=app[0]) as http:
        for r in (
            await http.get("/signup"),
            await http.post("/signup", data={"email": "a@example.com", "password": PASSWORD}),
        ):
            assert r.status_code == 404 and message(r) == signup.OFF
            assert "<form" not in r.text
        options = (await http.get("/accounts/options")).json()
    assert options == {"signup": False, "reset": False}
    assert await conn_app.fetchval("select count(*) from profiles") == 0


async def test_reset_without_smtp_names_the_variables(app):
    async with httpx.AsyncClient(base_url=app[0]) as http:
        for r in (
            await http.get("/reset"),
            await http.post("/reset", data={"email": "a@example.com"}),
            await http.get("/reset/confirm", params={"token": "x"}),
        ):
            assert r.status_code == 503 and message(r) == mail.OFF
    assert "VTAI_SMTP_HOST" in mail.OFF and "VTAI_SMTP_FROM" in mail.OFF


async def test_password_change_works_without_mail_or_signup(app, conn_app):
    user = await add_user(conn_app)
    async with httpx.AsyncClient(base_url=app[0]) as http:
        assert (
            await http.post("/login", data={"username": user.username, "password": PASSWORD})
        ).status_code == 200
        new = "another good passphrase"
        r = await http.post(
            "/account/password", data={"current": PASSWORD, "new": new, "again": new}
        )
        assert r.status_code == 200 and message(r) == password.DONE
    async with httpx.AsyncClient(base_url=app[0]) as http:
        r = await http.post("/login", data={"username": user.username, "password": new})
        assert r.status_code == 200


@pytest.fixture
async def conn_app(app):
    import asyncpg

    c = await asyncpg.connect(app[1])
    yield c
    await c.close()
