"""The /admin Plans panel: plans, the catalogue and weights, and the audit trail, through the
routes with Chainlit's real JWTs and a real Postgres; once in headless Chromium on the real app.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from tests.admin.test_routes import SECRET, sign_in
from tests.conftest import add_user, make_settings
from vtai.admin import routes as admin


@pytest.fixture
async def pool(db_url):
    p = await asyncpg.create_pool(db_url, min_size=1, max_size=4)
    yield p
    await p.close()


@pytest.fixture
async def client(pool, monkeypatch):
    monkeypatch.setenv("CHAINLIT_AUTH_SECRET", SECRET)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    app = FastAPI()
    admin.register(
        app, get_pool=lambda: pool, get_period=lambda: "month", get_limits=lambda: {"free": 15000}
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


@pytest.fixture
async def boss(conn):
    return await add_user(conn, "boss", admin=True)


async def audit(conn) -> list[tuple]:
    rows = await conn.fetch(
        "select actor, action, target, before::text as b, after::text as a from audit_log"
        " order by id"
    )
    return [(r["actor"], r["action"], r["target"], r["b"], r["a"]) for r in rows]


async def plan(conn, tier: str = "free") -> tuple:
    row = await conn.fetchrow(
        "select token_limit, daily_limit, usd_limit, rpm, models from tiers where name = $1", tier
    )
    return tuple(row.values())


DEFAULT_FREE = (10000, None, None, None, ["*"])


async def test_the_panel_shows_plans_models_weights_and_overrides(client, conn, boss):
    await conn.execute("insert into model_weights (pattern, weight) values ('openrouter/*', 0.5)")
    sign_in(client, boss)
    r = await client.get("/admin/api/plans")
    assert r.status_code == 200
    body = r.json()
    assert [t["name"] for t in body["tiers"]] == ["free", "basic", "premium", "unlimited"]
    assert body["tiers"][0] == {
        "name": "free",
        "rank": 0,
        "token_limit": 10000,
        "daily_limit": None,
        "usd_limit": None,
        "rpm": None,
        "models": ["*"],
    }
    models = {m["model"]: m for m in body["models"]}
    # a model whose key is missing is listed, as unavailable, naming the variable
    assert models["gpt-4o"]["available"] is False
    assert models["gpt-4o"]["reason"] == "OPENAI_API_KEY is not set"
    assert models["gpt-4o"]["key_variable"] == "OPENAI_API_KEY"
    assert models["local/smollm2-135m"]["available"] is True
    assert models["openrouter/openai/gpt-4o-mini"]["weight"] == 0.5
    assert body["weights"] == [
        {
            "pattern": "openrouter/*",
            "weight": 0.5,
            "updated_at": body["weights"][0]["updated_at"],
            "matches": [
                "openrouter/meta-llama/llama-3.3-70b-instruct",
                "openrouter/openai/gpt-4o-mini",
            ],
        }
    ]
    assert body["overrides"] == {"free": {"variable": "VTAI_LIMIT_FREE", "value": 15000}}
    assert body["audit"] == []


async def test_saving_a_plan_is_audited_as_the_admin(client, conn, boss):
    sign_in(client, boss)
    r = await client.post(
        "/admin/api/plans/free",
        json={
            "tokens": "20000",
            "daily": "2000",
            "usd": "1.50",
            "rpm": 10,
            "models": "local/*, gpt-4o-mini",
        },
    )
    assert r.status_code == 200, r.text
    saved = r.json()
    assert saved["changed"] is True
    assert saved["plan"]["usd_limit"] == "1.50" and saved["plan"]["models"] == [
        "local/*",
        "gpt-4o-mini",
    ]
    # VTAI_LIMIT_FREE is set (get_limits): it will put the token limit back at start-up
    assert len(saved["warnings"]) == 1 and saved["warnings"][0].startswith("VTAI_LIMIT_FREE=15000")
    assert await plan(conn) == (20000, 2000, Decimal("1.5"), 10, ["local/*", "gpt-4o-mini"])

    # blank or null clears a cap; a field not sent stays as it is
    r = await client.post("/admin/api/plans/free", json={"daily": "", "rpm": None})
    assert r.status_code == 200 and r.json()["warnings"] == []
    assert await plan(conn) == (20000, None, Decimal("1.5"), None, ["local/*", "gpt-4o-mini"])

    rows = await audit(conn)
    assert [(a, act, t) for a, act, t, _, _ in rows] == [("boss", "tier.set", "free")] * 2
    assert [json.loads(x) for x in rows[1][3:]] == [
        {"daily_limit": 2000, "rpm": 10},
        {"daily_limit": None, "rpm": None},
    ]
    trail = (await client.get("/admin/api/plans")).json()["audit"]
    assert [a["after"] for a in trail] == [
        {"daily_limit": None, "rpm": None},  # newest first
        {
            "token_limit": 20000,
            "daily_limit": 2000,
            "usd_limit": "1.50",
            "rpm": 10,
            "models": ["local/*", "gpt-4o-mini"],
        },
    ]
    assert trail[1]["before"]["token_limit"] == 10000 and trail[0]["actor"] == "boss"


@pytest.mark.parametrize(
    ("tier", "body", "detail"),
    [
        ("free", {"daily": "-5"}, "daily: -5 is negative"),
        ("free", {"tokens": -1}, "tokens: -1 is negative"),
        ("free", {"usd": "-0.01"}, "usd: -0.01 is negative"),
        ("free", {"usd": "a lot"}, "usd: 'a lot' is not an amount in US dollars"),
        ("free", {"rpm": "1.5"}, "rpm: '1.5' is not a whole number"),
        ("free", {"rpm": True}, "rpm: expected a number or none"),
        ("free", {"models": " , "}, "models: name at least one model"),
        ("free", {"tokens": "5", "colour": "red"}, "colour: not a plan field"),
        # a good field and a bad one: nothing is saved
        ("free", {"tokens": "5", "daily": "-1"}, "daily: -1 is negative"),
        ("gold", {"rpm": "5"}, "tier: unknown tier 'gold': choose one of free, basic, premium"),
        ("free", [1], "tier: send {"),
    ],
)
async def test_bad_input_is_one_line_naming_the_field(client, conn, boss, tier, body, detail):
    sign_in(client, boss)
    r = await client.post(f"/admin/api/plans/{tier}", json=body)
    assert r.status_code == 400 and r.json()["detail"].startswith(detail), r.text
    assert "\n" not in r.json()["detail"]
    assert await plan(conn) == DEFAULT_FREE and await audit(conn) == []


async def test_a_pattern_matching_no_model_is_saved_with_a_warning(client, conn, boss):
    sign_in(client, boss)
    r = await client.post("/admin/api/plans/basic", json={"models": "local/*,nothing/*"})
    assert r.status_code == 200
    assert r.json()["warnings"] == [
        "models: 'nothing/*' matches no model in the catalogue (vtai model list)"
    ]
    assert (await plan(conn, "basic"))[4] == ["local/*", "nothing/*"]


async def test_weights_models_and_user_tiers_are_audited_as_the_admin(client, conn, boss):
    bob = await add_user(conn, "bob")
    sign_in(client, boss)

    r = await client.post("/admin/api/weights", json={"pattern": "gpt-4o", "weight": "10"})
    assert r.status_code == 200 and r.json()["matches"] == ["gpt-4o"]
    assert r.json()["warnings"] == []
    r = await client.post("/admin/api/weights", json={"pattern": "nothing-*", "weight": 2})
    assert r.status_code == 200 and r.json()["warnings"] == [
        "pattern: no model matches 'nothing-*'"
    ]
    for bad, detail in (
        ({"pattern": "gpt-4o", "weight": "ten"}, "weight: must be a non-negative number"),
        ({"pattern": "gpt-4o", "weight": "-1"}, "weight: must be a non-negative number"),
        ({"pattern": "gpt-4o", "weight": 2e6}, "weight: must be a non-negative number up to"),
        ({"pattern": "", "weight": "1"}, "pattern: must be 1 to 200 characters"),
        ({"weight": "1"}, "pattern: a model name or a pattern"),
    ):
        r = await client.post("/admin/api/weights", json=bad)
        assert r.status_code == 400 and r.json()["detail"].startswith(detail), r.text

    r = await client.post("/admin/api/models/enabled", json={"model": "gpt-4o", "enabled": False})
    assert r.status_code == 200 and r.json()["changed"] is True
    r = await client.post("/admin/api/models/enabled", json={"model": "nope/x", "enabled": True})
    assert r.status_code == 400 and r.json()["detail"].startswith("model: no model 'nope/x'")
    r = await client.post("/admin/api/models/enabled", json={"model": "gpt-4o", "enabled": "no"})
    assert r.status_code == 400 and r.json()["detail"] == "enabled: true or false"

    r = await client.post(
        "/admin/api/models",
        json={
            "model": "openai/mine",
            "api_base": "http://127.0.0.1:9/v1",
            "api_key_env": "MINE_KEY_UNSET",
            "price_in": "0.000001",
            "weight": "",
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["available"] is False and r.json()["reason"] == "MINE_KEY_UNSET is not set"
    for bad, detail in (
        ({"model": "openai/x", "api_base": "ftp://h", "api_key_env": "K"}, "api_base: "),
        ({"model": "openai/x", "api_base": "http://h/v1"}, "api_key_env: required with api_base"),
        ({"model": "openai/x", "price_out": "cheap"}, "price_out: must be a non-negative"),
        ({"model": "gpt-4o"}, "model: 'gpt-4o' is already in the catalogue"),
        ({"display": "x"}, "model: the LiteLLM model name"),
    ):
        r = await client.post("/admin/api/models", json=bad)
        assert r.status_code == 400 and r.json()["detail"].startswith(detail), r.text

    r = await client.post(f"/admin/api/users/{bob.id}/tier", json={"tier": "premium"})
    assert r.status_code == 200

    rows = await audit(conn)
    assert {row[0] for row in rows} == {"boss"}
    assert [row[1:3] for row in rows] == [
        ("model.weight", "gpt-4o"),
        ("model.weight", "nothing-*"),
        ("model.disable", "gpt-4o"),
        ("model.add", "openai/mine"),
        ("user.tier", "bob"),
    ]
    assert rows[0][3:] == (None, '{"weight": 10.0}')
    assert rows[2][3:] == ('{"enabled": true}', '{"enabled": false}')
    assert rows[4][3:] == ('{"tier": "free"}', '{"tier": "premium"}')
    models = {m["model"]: m for m in (await client.get("/admin/api/plans")).json()["models"]}
    assert models["gpt-4o"]["weight"] == 10 and models["gpt-4o"]["enabled"] is False
    assert models["gpt-4o"]["reason"].startswith("disabled")


async def test_non_admins_and_other_origins_are_refused(client, conn, boss):
    bob = await add_user(conn, "bob")
    posts = (
        ("/admin/api/plans/free", {"tokens": "1"}),
        ("/admin/api/weights", {"pattern": "gpt-4o", "weight": "0"}),
        ("/admin/api/models/enabled", {"model": "gpt-4o", "enabled": False}),
        ("/admin/api/models", {"model": "openai/x", "api_key_env": "K"}),
    )
    # anonymous: 401
    assert (await client.get("/admin/api/plans")).status_code == 401
    for path, body in posts:
        assert (await client.post(path, json=body)).status_code == 401, path
    # a signed-in user whose token claims admin, but the database says no: 403
    sign_in(client, bob, is_admin=True)
    assert (await client.get("/admin/api/plans")).status_code == 403
    for path, body in posts:
        assert (await client.post(path, json=body)).status_code == 403, path
    # an admin's cookie, sent by a page on another origin: 403
    sign_in(client, boss)
    for path, body in posts:
        r = await client.post(path, json=body, headers={"Origin": "http://evil.example"})
        assert r.status_code == 403, path
    assert await plan(conn) == DEFAULT_FREE and await audit(conn) == []
    assert await conn.fetchval("select count(*) from model_weights") == 0
    assert await conn.fetchval("select enabled from models where model = 'gpt-4o'") is True


async def test_the_page_has_the_panel_and_no_inline_script(client, boss):
    sign_in(client, boss)
    r = await client.get("/admin")
    assert r.status_code == 200
    for element in ('id="plans-table"', 'id="catalogue"', 'id="weight-form"', 'id="audit"'):
        assert element in r.text
    scripts = re.findall(r"<script\b[^>]*>", r.text)
    assert scripts and all("src=" in s for s in scripts)
    assert not re.search(r"\son[a-z]+=", r.text)  # no inline event handlers either


async def test_without_a_database_the_panel_names_what_to_set(db_url, tmp_path, monkeypatch):
    from tests.fake_gotrue import FakeGotrue
    from tests.fake_postgrest import FakePostgrest, token
    from vtai.services import Services
    from vtai.ui import chat

    rest = await FakePostgrest(db_url, auth=FakeGotrue(db_url)).start()
    settings = make_settings(
        None,
        tmp_path,
        supabase_url=rest.url,
        supabase_service_key=token("service_role"),
        supabase_anon_key=token("anon"),
    )
    services = await Services.start(settings, replay=False)
    try:
        monkeypatch.setattr(chat, "_services", services)
        app = FastAPI()
        admin.register(app)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://vtai") as c:
            got = await c.get("/admin/api/plans")
            saved = await c.post("/admin/api/plans/free", json={"tokens": "1"})
    finally:
        await services.stop()
        await rest.stop()
    for r in (got, saved):
        assert r.status_code == 503 and "set SUPABASE_DB_URL" in r.json()["detail"]
        assert "\n" not in r.json()["detail"]


@pytest.mark.browser
async def test_plans_panel_in_the_browser(db_url, conn, tmp_path):
    from tests.browser import browser_page, login, running_app, screenshot

    await add_user(conn, "root", admin=True)
    async with running_app(db_url, tmp_path) as base, browser_page() as page:
        await login(page, base, "root")
        await page.goto(base + "/admin", wait_until="domcontentloaded")
        await page.wait_for_selector("body[data-loaded=true]", timeout=30_000)
        free = page.locator("#plans-table tr[data-tier=free]")
        assert await free.locator("[name=tokens]").input_value() == "10000"
        assert await free.locator("[name=models]").input_value() == "*"
        gpt = page.locator("#catalogue tr[data-model=gpt-4o]")
        assert "unavailable: OPENAI_API_KEY is not set" in await gpt.inner_text()

        # Something typed in another tier's row survives a refused save and a good one.
        basic = page.locator("#plans-table tr[data-tier=basic]")
        await basic.locator("[name=rpm]").fill("7")
        await free.locator("[name=tokens]").fill("20000")
        await free.locator("[name=daily]").fill("-5")
        await free.locator("button.save-plan").click()
        await page.wait_for_selector("#plans-message.error")
        message = await page.inner_text("#plans-message")
        assert message == (
            "The free plan was not saved: daily: -5 is negative: a cap is 0 or more, or none "
            "for no cap"
        )
        assert await free.locator("[name=daily]").get_attribute("class") == "invalid"
        assert await free.locator("[name=tokens]").input_value() == "20000"
        assert await plan(conn) == DEFAULT_FREE

        # Another admin (here the CLI's SQL) sets the rate meanwhile: this save leaves it be.
        await conn.execute("update tiers set rpm = 9 where name = 'free'")
        await free.locator("[name=daily]").fill("2000")
        await free.locator("[name=usd]").fill("1.50")
        await free.locator("[name=models]").fill("local/*, gpt-4o-mini")
        await free.locator("button.save-plan").click()
        await page.wait_for_selector("#plans-message:has-text('Saved the free plan.')")
        await page.wait_for_selector("#audit tbody tr:first-child:has-text('tier.set')")
        first = await page.locator("#audit tbody tr").first.inner_text()
        assert "root" in first and "free" in first and '"daily_limit":2000' in first
        assert await basic.locator("[name=rpm]").input_value() == "7"
        # the users table shows the new limit
        await page.wait_for_selector("#users tr[data-user=root]:has-text('20,000')")
        assert await plan(conn) == (20000, 2000, Decimal("1.5"), 9, ["local/*", "gpt-4o-mini"])

        # A weight that is not a number, then a good one; then disable a model.
        await page.fill("#weight-form [name=pattern]", "gpt-4o")
        await page.fill("#weight-form [name=weight]", "ten")
        await page.click("#weight-form button[type=submit]")
        await page.wait_for_selector("#plans-message.error:has-text('weight: must be')")
        assert await page.input_value("#weight-form [name=pattern]") == "gpt-4o"
        await page.fill("#weight-form [name=weight]", "10")
        await page.click("#weight-form button[type=submit]")
        await page.wait_for_selector("#weights tr[data-pattern=gpt-4o]")
        await gpt.locator("button.toggle-model").click()
        await page.wait_for_selector("#catalogue tr[data-model=gpt-4o]:has-text('Enable')")
        await screenshot(page, "admin_plans_panel")
    rows = await audit(conn)
    assert [r[:3] for r in rows] == [
        ("root", "tier.set", "free"),
        ("root", "model.weight", "gpt-4o"),
        ("root", "model.disable", "gpt-4o"),
    ]
