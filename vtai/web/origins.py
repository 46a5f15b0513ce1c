"""Same-origin only: CORS, socket.io origins, and the security headers on every response.

One rule decides whether a request's `Origin` may act with the user's cookie: the origin is
the app's own (the same host and port as the request's `Host`, or `VTAI_PUBLIC_URL`), or one
listed in `VTAI_ALLOWED_ORIGINS`. A request without an `Origin` header is not from a page in
a browser (browsers send one on every websocket, cross-origin and non-GET request), so it
passes: its cookie, if any, was not handed over by a browser to someone else's page.

The rule is applied to
- CORS: Chainlit's CORSMiddleware answers only the listed origins (same-origin requests never
  need CORS), so another page cannot read `/admin/api/*` or `/project/*` with the cookie;
- socket.io: every handshake, websocket or polling, from another origin is refused before
  the engine sees it, and the `connect` handler checks again;
- every state-changing request (not GET, HEAD or OPTIONS) from another origin is refused
  with 403 (the session cookie is SameSite=lax, which still lets a page on another port of
  the same host send it); vtai.admin.routes checks its routes with the same function.

Every HTTP response also carries a Content-Security-Policy that fits Chainlit's page and the
admin dashboard, `X-Frame-Options: DENY`, a Referrer-Policy and `X-Content-Type-Options`.
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import wraps
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SOCKET_PATH = "/ws/socket.io"
# An identity provider posts its answer here from its own origin (Azure AD hybrid flow).
CROSS_ORIGIN_POSTS = ("/auth/oauth/",)
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}

# Chainlit's index.html loads Inter from Google Fonts and KaTeX's stylesheet (and its fonts)
# from jsDelivr; its components inject <style> elements, hence 'unsafe-inline' for styles.
# Scripts stay strict: the app's own files plus the hashes of Chainlit's inline scripts.
STYLE_HOSTS = "https://fonts.googleapis.com https://cdn.jsdelivr.net"
FONT_HOSTS = "https://fonts.gstatic.com https://cdn.jsdelivr.net"

_INLINE_SCRIPT = re.compile(r"<script(?![^>]*\bsrc\s*=)[^>]*>(.*?)</script>", re.S | re.I)


@dataclass(frozen=True)
class Policy:
    # Normalised (scheme, host, port) of VTAI_ALLOWED_ORIGINS and VTAI_PUBLIC_URL.
    listed: frozenset[tuple[str, str, int]] = frozenset()
    headers: tuple[tuple[bytes, bytes], ...] = ()


def _parse_origin(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an `Origin` value; None for `null` or anything malformed."""
    try:
        parts = urlsplit(origin.strip())
        scheme = parts.scheme.lower()
        host = (parts.hostname or "").lower()
        port = parts.port or DEFAULT_PORTS.get(scheme)
    except ValueError:
        return None
    if scheme not in ("http", "https") or not host or port is None:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        return None
    return scheme, host, port


def _parse_host(host: str, scheme: str) -> tuple[str, int] | None:
    try:
        parts = urlsplit("//" + host.strip())
        name = (parts.hostname or "").lower()
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError:
        return None
    return (name, port) if name else None


def policy_for(settings) -> Policy:
    listed = [o for o in (*settings.allowed_origins, settings.public_url) if o]
    parsed = {p for o in listed if (p := _parse_origin(o))}
    return Policy(frozenset(parsed), tuple(_security_headers(_inline_script_hashes())))


_policy = Policy()


def origin_allowed(origin: str | None, host: str | None) -> bool:
    """May a page at `origin` act on this app, for a request whose Host header is `host`?"""
    if origin is None:
        return True
    parsed = _parse_origin(origin)
    if parsed is None:
        return False
    if parsed in _policy.listed:
        return True
    own = _parse_host(host, parsed[0]) if host else None
    return own is not None and own == parsed[1:]


def request_origin_allowed(headers: Mapping[str, str]) -> bool:
    """origin_allowed for a request's headers (a Starlette Headers, lower-case keys)."""
    return origin_allowed(headers.get("origin"), headers.get("host"))


# ---------------------------------------------------------------------------------------------
# Headers


def _inline_script_hashes() -> list[str]:
    """CSP hashes of the inline <script> blocks in the page Chainlit serves at `/`."""
    try:
        from chainlit.server import get_html_template

        html = get_html_template("")
    except Exception:  # no Chainlit UI build (unit tests): no inline scripts to allow
        log.debug("no Chainlit page to hash", exc_info=True)
        return []
    return [
        "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"
        for body in _INLINE_SCRIPT.findall(html)
    ]


def content_security_policy(script_hashes: list[str]) -> str:
    return "; ".join(
        [
            "default-src 'self'",
            " ".join(["script-src 'self'", *script_hashes]),
            f"style-src 'self' 'unsafe-inline' {STYLE_HOSTS}",
            f"font-src 'self' data: {FONT_HOSTS}",
            # No remote images: a model's answer cannot make the browser call out with
            # ![](https://elsewhere/?data) markdown.
            "img-src 'self' data: blob:",
            "media-src 'self' data: blob:",
            # 'self' covers ws:/wss: to the same host and port (CSP level 3).
            "connect-src 'self'",
            "worker-src 'self' blob:",
            "object-src 'none'",
            "base-uri 'self'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        ]
    )


def _security_headers(script_hashes: list[str]) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-security-policy", content_security_policy(script_hashes).encode()),
        (b"x-frame-options", b"DENY"),
        (b"referrer-policy", b"same-origin"),
        (b"x-content-type-options", b"nosniff"),
    ]


# ---------------------------------------------------------------------------------------------
# The ASGI middleware: refuses what the rule refuses, adds the headers to the rest


def _refused(scope) -> bool:
    from starlette.datastructures import Headers

    headers = Headers(scope=scope)
    origin = headers.get("origin")
    if origin is None or origin_allowed(origin, headers.get("host")):
        return False
    if scope["type"] == "websocket":
        return True
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if path.startswith(root):
        path = path[len(root) :] or "/"
    if SOCKET_PATH in path:
        return True
    if scope.get("method", "GET") in SAFE_METHODS:
        return False
    return not path.startswith(CROSS_ORIGIN_POSTS)


class SameOriginMiddleware:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if _refused(scope):
            await self._refuse(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return

        extra = _policy.headers

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", ())}
                message = dict(message)
                message["headers"] = [
                    *message.get("headers", ()),
                    *((k, v) for k, v in extra if k not in present),
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    @staticmethod
    async def _refuse(scope, receive, send) -> None:
        from starlette.datastructures import Headers

        headers = Headers(scope=scope)
        log.warning(
            "refused %s %s from origin %s (host %s)",
            scope.get("method", "WEBSOCKET"),
            scope.get("path"),
            headers.get("origin"),
            headers.get("host"),
        )
        if scope["type"] == "websocket":
            # Closing before accepting makes the server answer the handshake with 403.
            await send({"type": "websocket.close", "code": 1008})
            return
        body = b"cross-origin request refused\n"
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                    *_policy.headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _listed_cors_middleware():
    from starlette.middleware.cors import CORSMiddleware

    class ListedOriginsCORS(CORSMiddleware):
        """Chainlit's CORSMiddleware, answering only the origins the policy lists."""

        def __init__(self, app, **kwargs) -> None:
            kwargs["allow_origins"] = ()
            kwargs.pop("allow_origin_regex", None)
            super().__init__(app, **kwargs)

        def is_allowed_origin(self, origin: str) -> bool:
            parsed = _parse_origin(origin)
            return parsed is not None and parsed in _policy.listed

    return ListedOriginsCORS


# ---------------------------------------------------------------------------------------------
# socket.io


def _wrap_connect(sio) -> None:
    handlers = sio.handlers.setdefault("/", {})
    inner = handlers.get("connect")
    if inner is None or getattr(inner, "vtai_origin_checked", False):
        return

    @wraps(inner)
    async def connect(sid, environ, auth=None):
        if not origin_allowed(environ.get("HTTP_ORIGIN"), environ.get("HTTP_HOST")):
            log.warning("refused socket.io connect from origin %s", environ.get("HTTP_ORIGIN"))
            raise ConnectionRefusedError("cross-origin connection refused")
        result = inner(sid, environ, auth)
        return await result if inspect.isawaitable(result) else result

    connect.vtai_origin_checked = True
    handlers["connect"] = connect


def install(app, sio, settings) -> None:
    """Called once from vtai/main.py with Chainlit's FastAPI app and socket.io server.

    Calling it again (Chainlit's --watch re-imports main.py) only refreshes the policy: the
    middleware reads it on every request.
    """
    global _policy
    _policy = policy_for(settings)
    _wrap_connect(sio)
    if getattr(app, "vtai_web_security", False):
        return
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware

    cors = _listed_cors_middleware()
    app.user_middleware[:] = [
        Middleware(cors, *m.args, **m.kwargs) if m.cls is CORSMiddleware else m
        for m in app.user_middleware
    ]
    # Outermost, whatever else is installed after us and even around Starlette's own error
    # handler: a refused request goes no further, and every response gets the headers.
    build = app.build_middleware_stack
    app.build_middleware_stack = lambda: SameOriginMiddleware(build())
    app.vtai_web_security = True
