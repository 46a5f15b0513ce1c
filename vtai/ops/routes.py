"""HTTP routes of vtai.ops: /healthz, /readyz and /metrics.

/healthz and /readyz answer anyone (load balancers and orchestrators are remote). /metrics
answers loopback clients only, unless VTAI_METRICS_TOKEN is set: then every client, loopback
too, must send `Authorization: Bearer <token>`. A request that came through a proxy (it carries
X-Forwarded-For, Forwarded or X-Real-IP) is remote whatever its peer: a proxy on this host
would otherwise make every client look local.

The three paths are served ahead of the login check (vtai.web.sessions), which would strip a
metrics token it takes for a dead login, and which asks the database: a liveness probe must
not. They are also routes of the app, ahead of Chainlit's catch-all page.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, Router

from vtai.ops import health, metrics

log = logging.getLogger(__name__)

PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
PROXY_HEADERS = (b"x-forwarded-for", b"forwarded", b"x-real-ip")
NO_STORE = {"Cache-Control": "no-store"}


def _services():
    from vtai.ui import chat

    try:
        return chat.services()
    except RuntimeError:
        return None


# --- Who may read /metrics ------------------------------------------------------------------

_trusted: tuple[int, tuple] = (0, ())


def _trusted_networks(settings) -> tuple:
    global _trusted
    if _trusted[0] != id(settings):
        networks = tuple(ipaddress.ip_network(n) for n in settings.trusted_proxies)
        _trusted = (id(settings), networks)
    return _trusted[1]


def _client(scope, settings) -> tuple[str | None, bool]:
    """(the client's address, whether it is this host and came through no proxy)."""
    from vtai.web.sessions import request_address

    address = request_address(scope, _trusted_networks(settings))
    proxied = any(key in PROXY_HEADERS for key, _ in scope.get("headers", ()))
    try:
        local = not proxied and ipaddress.ip_address(address or "").is_loopback
    except ValueError:
        local = False
    return address, local


def refusal(request: Request, settings) -> Response | None:
    """None when this request may read the metrics, else the answer to send."""
    token = settings.metrics_token.get_secret_value() if settings.metrics_token else None
    address, local = _client(request.scope, settings)
    if token:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        given = given.strip() if scheme.lower() == "bearer" else ""
        if hmac.compare_digest(given.encode(), token.encode()):
            return None
        log.warning("refused /metrics to %s: missing or wrong bearer token", address)
        return JSONResponse(
            {"detail": "Send the metrics token as `Authorization: Bearer <token>`."},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer", **NO_STORE},
        )
    if local:
        return None
    log.warning("refused /metrics to %s: not a loopback client", address)
    return JSONResponse(
        {
            "detail": "Metrics are served to loopback clients only: set VTAI_METRICS_TOKEN to "
            "read them from elsewhere with `Authorization: Bearer <token>`."
        },
        status_code=403,
        headers=NO_STORE,
    )


# --- The routes -----------------------------------------------------------------------------


async def healthz(request: Request) -> Response:
    healthy, body = health.report(health.liveness(_services()))
    return JSONResponse(body, status_code=200 if healthy else 503, headers=NO_STORE)


async def readyz(request: Request) -> Response:
    ready, body = health.report(await health.readiness(_services()))
    return JSONResponse(body, status_code=200 if ready else 503, headers=NO_STORE)


async def metrics_text(request: Request) -> Response:
    services = _services()
    if services is None:
        return JSONResponse({"detail": "starting or stopping"}, 503, headers=NO_STORE)
    refused = refusal(request, services.settings)
    if refused is not None:
        return refused
    body, content_type = await metrics.scrape(services)
    return Response(body, media_type=content_type, headers=NO_STORE)


def build_routes() -> list[Route]:
    # Plain Starlette routes: served from OpsFirst too, outside FastAPI's own middleware.
    return [
        Route("/healthz", healthz, methods=["GET", "HEAD"], include_in_schema=False),
        Route("/readyz", readyz, methods=["GET", "HEAD"], include_in_schema=False),
        Route("/metrics", metrics_text, methods=["GET", "HEAD"], include_in_schema=False),
    ]


class OpsFirst:
    """ASGI middleware: the ops paths go straight to their routes, ahead of the rest of the
    app's middleware (the login check among it)."""

    def __init__(self, app) -> None:
        self.app = app
        self.router = Router(routes=build_routes())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and _path(scope) in PATHS:
            await self.router(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _path(scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root) :] or "/" if root and path.startswith(root) else path


def register(app: FastAPI) -> None:
    """Add this package's routes to Chainlit's FastAPI app, ahead of its catch-all page.

    Calling it again (Chainlit's --watch re-imports main.py) replaces them."""
    from starlette.middleware import Middleware

    app.router.routes[:] = [r for r in app.router.routes if not getattr(r, "vtai_ops", False)]
    added = build_routes()
    for route in added:
        route.vtai_ops = True
    app.router.routes[0:0] = added
    app.user_middleware[:] = [m for m in app.user_middleware if m.cls is not OpsFirst]
    # First in the list is outermost: ahead of the login check, whenever that is installed.
    app.user_middleware.insert(0, Middleware(OpsFirst))
