"""The webhook in Supabase REST-only mode (no database URL): the same SQL functions, called over
PostgREST's /rpc. PostgREST is a STAND-IN here (tests/fake_postgrest.py runs the real functions
in the real Postgres under the service_role's grants), hence `stand_in` in the test's name."""

from __future__ import annotations

from types import SimpleNamespace

from fastapi import FastAPI

from tests.billing import conftest as bc
from tests.billing.conftest import basil_subscription, event
from tests.conftest import add_user
from tests.fake_postgrest import FakePostgrest, token
from vtai.billing import grace, webhook
from vtai.rest.store import SupabaseStore


async def test_webhook_rest_mode_stand_in_postgrest_applies_events_once(
    db_url, tmp_path, conn, stripe_api, monkeypatch
):
    rest = await FakePostgrest(db_url).start()
    store = await SupabaseStore.connect(rest.url, token("service_role"))
    price = await stripe_api.price("premium")
    settings = bc.billing_settings(db_url, tmp_path).model_copy(
        update={"stripe_prices": {price: "premium"}}
    )
    services = SimpleNamespace(settings=settings, db=None, store=store)
    monkeypatch.setattr(webhook, "_services", lambda: services)
    app = FastAPI()
    webhook.register(app)
    server, task, sock, base = await bc.serve(app)
    try:
        user = await add_user(conn)
        customer = await stripe_api.customer(user.id)
        sub = await stripe_api.subscription(customer["id"], price, user.id)
        created = event("customer.subscription.created", basil_subscription(sub))
        body = bc.json.dumps(created).encode()
        async with bc.httpx.AsyncClient() as http:
            for applied in (True, False):
                response = await http.post(
                    base + webhook.PATH, content=body, headers={"stripe-signature": bc.sign(body)}
                )
                assert response.status_code == 200, response.text
                assert response.json()["applied"] is applied
        assert await conn.fetchval("select tier from profiles where id = $1", user.id) == "premium"
        assert await conn.fetchval("select count(*) from billing_events") == 1
        # The sweep goes the same way.
        assert await grace.sweep(services, settings) == []
    finally:
        server.should_exit = True
        await task
        sock.close()
        await store.close()
        await rest.stop()


async def test_webhook_rest_stand_in_postgrest_refuses_the_functions_to_anon(db_url):
    """The functions the webhook calls over /rpc are refused to the anon key."""
    rest = await FakePostgrest(db_url).start()
    store = await SupabaseStore.connect(rest.url, token("anon"))
    try:
        try:
            await store._rpc(
                "vtai_billing_sweep", {"p_now": "2026-01-01T00:00:00Z", "p_grace_days": 0}
            )
        except Exception as exc:  # PostgREST's 401/403 as the client raises it
            assert "permission denied" in str(exc).lower() or "42501" in str(exc)
        else:
            raise AssertionError("anon ran vtai_billing_sweep")
    finally:
        await store.close()
        await rest.stop()
