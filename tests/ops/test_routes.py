"""Who may read /metrics, on the routes as vtai.ops.routes registers them (in process, with the
real services on a real database; tests/ops/test_app.py does the same on the running app)."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from starlette.responses import JSONResponse

from vtai.ops import routes

TOKEN = "a-metrics-token-of-some-length"


def app_for(services, monkeypatch, **settings) -> FastAPI:
    services.settings = services.settings.model_copy(update=settings)
    monkeypatch.setattr(routes, "_services", lambda: services)
    app = FastAPI()
    routes.register(app)
    return app


async def get(app, path: str = "/metrics", peer: str = "127.0.0.1", **headers) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, client=(peer, 50123))
    async with httpx.AsyncClient(transport=transport, base_url="http://vtai.test") as client:
        return await client.get(path, headers=headers)


async def test_metrics_answer_loopback_clients_that_came_through_no_proxy(services, monkeypatch):
    app = app_for(services, monkeypatch, trusted_proxies=("127.0.0.1",))
    local = await get(app)
    assert local.status_code == 200
    names = {f.name for f in text_string_to_metric_families(local.text)}
    assert {"vtai_turns", "vtai_gate_reserve_seconds", "vtai_spool_rows"} <= names
    assert (await get(app, peer="::1")).status_code == 200
    assert (await get(app, peer="203.0.113.5")).status_code == 403
    # From the trusted proxy on this host: the client is elsewhere, even when it says it isn't.
    for header, client in [
        ("X-Forwarded-For", "203.0.113.5"),
        ("X-Forwarded-For", "127.0.0.1"),
        ("Forwarded", "for=127.0.0.1"),
        ("X-Real-IP", "127.0.0.1"),
    ]:
        refused = await get(app, **{header: client})
        assert refused.status_code == 403, header
        assert "VTAI_METRICS_TOKEN" in refused.json()["detail"]


async def test_once_a_token_is_set_every_client_must_send_it(services, monkeypatch):
    app = app_for(services, monkeypatch, metrics_token=SecretStr(TOKEN))
    assert (await get(app)).status_code == 401
    assert (await get(app, Authorization=f"Bearer {TOKEN[:-1]}")).status_code == 401
    assert (await get(app, Authorization=f"Basic {TOKEN}")).status_code == 401
    remote = await get(app, peer="203.0.113.5", Authorization=f"Bearer {TOKEN}")
    assert remote.status_code == 200 and remote.headers["cache-control"] == "no-store"


async def test_ops_paths_are_served_ahead_of_the_apps_other_middleware(services, monkeypatch):
    """The login check (vtai.web.sessions) strips a bearer token it takes for a dead login and
    asks the database; the ops paths never meet it."""
    app = app_for(services, monkeypatch, metrics_token=SecretStr(TOKEN))

    class RefuseEverything:
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            await JSONResponse({"detail": "login check"}, 401)(scope, receive, send)

    app.add_middleware(RefuseEverything)
    routes.register(app)  # again, as a re-import does: still once, still first
    assert (await get(app, Authorization=f"Bearer {TOKEN}")).status_code == 200
    assert (await get(app, "/healthz")).status_code == 200
    assert (await get(app, "/admin")).status_code == 401
    assert sum(m.cls is routes.OpsFirst for m in app.user_middleware) == 1


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
async def test_without_running_services_the_paths_say_so(path, monkeypatch):
    monkeypatch.setattr(routes, "_services", lambda: None)
    app = FastAPI()
    routes.register(app)
    reply = await get(app, path)
    assert reply.status_code == 503
