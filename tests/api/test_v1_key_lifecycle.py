"""A key's life through the real server (tests/api/conftest.py), as its user lives it: made on
/account with the chat's login, used on /v1 and next to the web chat, found nowhere afterwards
(no table, no log), revoked on /account and refused at once. And /v1 when the database is gone
with the gate closed: 503 in OpenAI's shape.

The model is tests/fake_provider.py, a FAKE OpenAI-compatible provider."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from tests.api.v1_app import HELLO, MODEL
from tests.browser import PASSWORD
from tests.chainlit_client import ChatClient, login
from vtai.api import keys

pytestmark = [pytest.mark.browser, pytest.mark.slow]


async def found_in_database(app, needle: str) -> list[str]:
    """The tables (every schema but the system's, chat history included) in which some row, as
    text (every column of it), contains `needle`."""
    tables = await app.sql(
        "select table_schema, table_name from information_schema.tables"
        " where table_type = 'BASE TABLE'"
        " and table_schema not in ('pg_catalog', 'information_schema')"
    )
    found = []
    for t in tables:
        ident = f'"{t["table_schema"]}"."{t["table_name"]}"'
        query = f"select count(*) as n from {ident} x where strpos(x::text, $1) > 0"
        (hit,) = await app.sql(query, needle)
        if hit["n"]:
            found.append(ident)
    return found


async def test_a_key_made_on_account_is_shown_once_stored_nowhere_and_revoked_at_once(app):
    user, _ = await app.user_on_plan(token_limit=100_000)
    cookie = await login(app.base, user.username, PASSWORD)
    page = httpx.AsyncClient(
        base_url=app.base,
        cookies={"access_token": cookie},
        headers={"Origin": app.base},  # the page's own origin, as the browser sends it
        timeout=30,
    )
    async with page:
        made = await page.post("/account/api/keys", json={"label": "script", "expires_days": 30})
        assert made.status_code == 201, made.text
        plain, key_id = made.json()["secret"], made.json()["key"]["id"]
        assert keys.well_formed(plain)
        secret = plain[len(keys.KEY_PREFIX) :]
        listed = await page.get("/account/api/keys")
        assert [k["id"] for k in listed.json()["keys"]] == [key_id]
        assert secret[:20] not in listed.text  # shown once: never again

        # The key on /v1, streamed and not, and the same user in the web chat meanwhile.
        async with app.client(plain, max_retries=0) as api:
            reply = await api.chat.completions.create(model=MODEL, messages=HELLO)
            assert reply.choices[0].message.content
            chat = ChatClient(app.base, cookie)
            async with chat:
                await chat.connect()
                answered = await chat.send("Hello from the web chat, key lifecycle")
                stream = await api.chat.completions.create(model=MODEL, messages=HELLO, stream=True)
                assert [c async for c in stream]
            assert answered.answer is not None
            assert MODEL in [m.id for m in (await api.models.list()).data]
        rows = await app.rows(user, 3)
        assert sorted(r["source"] for r in rows) == ["api", "api", "chat"]
        assert {r["api_key_id"] for r in rows if r["source"] == "api"} == {await app.key_id(plain)}
        assert str(await app.key_id(plain)) == key_id
        await app.settled(user)

        # The chat's history is written too (off the reply's path): wait for it, so the search
        # below covers it.
        async with asyncio.timeout(30):
            while True:
                if '"public"."Step"' in await found_in_database(app, "key lifecycle"):
                    break
                await asyncio.sleep(0.2)
        assert await found_in_database(app, secret[:20]) == []
        assert await found_in_database(app, keys.hash_key(plain)) == ['"public"."api_keys"']
        log = app.log
        assert "Your app is available" in log and secret[:20] not in log
        for path in app.data_dir.rglob("*"):
            if path.is_file():
                assert secret[:20].encode() not in path.read_bytes(), path

        # Revoked on /account: the very next request is refused.
        revoked = await page.post(f"/account/api/keys/{key_id}/revoke")
        assert revoked.status_code == 200 and revoked.json()["key"]["state"] == "revoked"
    async with app.client(plain, max_retries=0) as api:
        with pytest.raises(openai.AuthenticationError) as refused:
            await api.chat.completions.create(model=MODEL, messages=HELLO)
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"


async def test_503_in_openai_shape_while_the_database_is_down_and_the_gate_closed(app, provider):
    user, key = await app.user_with_key(token_limit=100_000)
    calls = len(provider.calls)
    app.proxy.cut()
    try:
        async with app.client(key, max_retries=0) as api:
            for stream in (False, True):
                with pytest.raises(openai.InternalServerError) as down:
                    await api.chat.completions.create(model=MODEL, messages=HELLO, stream=stream)
                assert isinstance(down.value, openai.APIStatusError)
                assert down.value.status_code == 503
                assert down.value.code == "usage_service_unavailable"
                assert down.value.type == "api_error"
                body = down.value.response.json()
                assert set(body["error"]) == {"message", "type", "param", "code"}
                assert down.value.response.headers["retry-after"] == "5"
            with pytest.raises(openai.InternalServerError):
                await api.models.list()
        assert len(provider.calls) == calls  # nothing unmetered reached the model
    finally:
        app.proxy.restore()
    # Back: the next request is answered (and the app is ready again for the other tests).
    async with app.client(key, max_retries=0) as api, asyncio.timeout(30):
        while True:
            try:
                await api.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
                break
            except openai.InternalServerError:
                await asyncio.sleep(0.2)
    async with httpx.AsyncClient(base_url=app.base) as http, asyncio.timeout(30):
        while True:
            if (await http.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.2)
    rows = await app.rows(user, 1)
    assert [json.loads(r["additional_details"]).get("reason") for r in rows] == [None]
    assert await app.sql("select * from vtai_verify_counters()") == []
