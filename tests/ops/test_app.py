"""/metrics, /healthz and /readyz on the real running app (`chainlit run vtai/main.py`), behind
its real middleware, against a Postgres of its own that a test stops and starts again.

The model is tests/fake_provider.py, a FAKE OpenAI-compatible provider, called through /v1.
"""

from __future__ import annotations

import asyncio

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.browser import running_app
from tests.conftest import add_user
from tests.fake_provider import FakeProvider
from vtai.api import keys
from vtai.db import embedded as embedded_pg

pytestmark = pytest.mark.slow

MODEL = "openai/fake"
TOKEN = "metrics-token-for-tests-" + "t" * 20


@pytest.fixture(scope="module")
def provider():
    p = FakeProvider().start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pg = embedded_pg.start(tmp_path_factory.mktemp("pg"))
    yield pg
    pg.stop(force=True)


@pytest.fixture(scope="module")
async def app(server, provider, tmp_path_factory):
    api_base = provider.url("script")
    env = {
        "VTAI_MODEL": MODEL,
        "OPENAI_API_BASE": api_base,
        "OPENAI_BASE_URL": api_base,
        "OPENAI_API_KEY": "sk-test-not-a-real-key",
        "VTAI_MAX_TOKENS": "40",
        "VTAI_METRICS_TOKEN": TOKEN,
        "VTAI_TRUSTED_PROXIES": "127.0.0.1",
        "VTAI_RESERVE_AHEAD": "off",
    }
    async with running_app(server.url, tmp_path_factory.mktemp("app"), **env) as base:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            yield client


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, tuple], float]:
    reply = await client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert reply.status_code == 200, reply.text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(reply.text)
        for s in family.samples
    }


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape_until(client, check, timeout: float = 30.0):
    """The first scrape `check` accepts: rows land in the ledger off the reply's path."""
    async with asyncio.timeout(timeout):
        while True:
            samples = await scrape(client)
            if check(samples):
                return samples
            await asyncio.sleep(0.1)


async def user_key(url: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        user = await add_user(conn, tier="unlimited")
        _, plain = await keys.create(conn, user.id, "metrics test", actor="test")
        return plain
    finally:
        await conn.close()


def ask(text: str, model: str = MODEL) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}]}


async def test_counters_move_after_a_metered_turn_a_refusal_and_a_provider_error(app, server):
    key = await user_key(server.url)
    auth = {"Authorization": f"Bearer {key}"}
    before = await scrape(app)

    answered = await app.post("/v1/chat/completions", json=ask("Say hello"), headers=auth)
    assert answered.status_code == 200, answered.text
    usage = answered.json()["usage"]
    refused = await app.post("/v1/chat/completions", json=ask("hi", "nobody/offers"), headers=auth)
    assert refused.status_code >= 400
    failed = await app.post("/v1/chat/completions", json=ask("#mode:429 hi"), headers=auth)
    assert failed.status_code >= 400
    anonymous = await app.post("/v1/chat/completions", json=ask("hi"))
    assert anonymous.status_code == 401

    def moved(after, name, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # The rows are written off the reply's path, by more than one writer: wait for all three.
    after = await scrape_until(
        app,
        lambda s: all(
            moved(s, "vtai_ledger_rows_total", status=status) >= 1
            for status in ("success", "refused", "failure")
        ),
    )
    turn = {"model": MODEL, "source": "api"}
    assert moved(after, "vtai_turns_total", status="answered", **turn) == 1
    assert moved(after, "vtai_turns_total", status="failed", **turn) == 1
    assert moved(after, "vtai_turns_total", status="refused", model="-", source="api") == 1
    assert moved(after, "vtai_refusals_total", reason="model_not_offered") == 1
    assert moved(after, "vtai_provider_errors_total", model=MODEL, **{"class": "RateLimitError"})
    assert moved(after, "vtai_tokens_total", model=MODEL, kind="prompt") >= usage["prompt_tokens"]
    assert (
        moved(after, "vtai_tokens_total", model=MODEL, kind="completion")
        >= (usage["completion_tokens"])
    )
    assert moved(after, "vtai_ledger_rows_total", status="success") == 1
    assert moved(after, "vtai_ledger_rows_total", status="refused") == 1
    assert moved(after, "vtai_gate_reserve_seconds_count") == 2
    assert moved(after, "vtai_ledger_batch_rows_count") >= 1
    assert moved(after, "vtai_api_unauthenticated_requests_total") == 1
    assert value(after, "vtai_reservations_held") >= 0
    spool = [k for k in after if k[0] == "vtai_spool_rows"]
    assert spool and all(after[k] == 0 for k in spool)


async def test_the_metrics_token_is_checked_and_survives_the_login_check(app):
    assert (await app.get("/metrics")).status_code == 401
    wrong = await app.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}x"})
    assert wrong.status_code == 401
    proxied = await app.get(
        "/metrics", headers={"Authorization": f"Bearer {TOKEN}", "X-Forwarded-For": "203.0.113.9"}
    )
    assert proxied.status_code == 200 and "vtai_turns" in proxied.text


async def test_readyz_follows_the_database_while_healthz_stays_up(app, server):
    async def ready_is(status: int) -> dict:
        async with asyncio.timeout(30):
            while True:
                reply = await app.get("/readyz")
                if reply.status_code == status:
                    return reply.json()
                await asyncio.sleep(0.1)

    ready = await ready_is(200)
    assert ready["checks"]["database"]["state"] == "ok"
    assert ready["checks"]["migrations"]["state"] == "ok"
    assert ready["checks"]["local_model"]["state"] == "skip"

    await asyncio.to_thread(server.stop, force=True)
    try:
        down = await ready_is(503)
        assert down["status"] == "fail" and down["checks"]["database"]["state"] == "fail"
        assert down["checks"]["spool"]["state"] == "ok"
        live = await app.get("/healthz")
        assert live.status_code == 200 and live.json()["status"] == "ok"
    finally:
        await asyncio.to_thread(server.restart)
    back = await ready_is(200)
    assert back["checks"]["database"]["state"] == "ok"
