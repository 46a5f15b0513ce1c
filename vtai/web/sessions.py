"""Logins the server can end: each login is a row, and every request and socket event checks it.

A login creates a row in vtai_private.login_sessions (vtai_session_start()); its id (`sid`)
goes into the cl.User metadata, so it travels inside Chainlit's signed `access_token` cookie.
Every HTTP request that carries the cookie or a Bearer token, every socket.io connect and
every socket event then asks vtai_session_live() (two primary-key lookups, no cache), so a
login ended by logout, a password change, `vtai user logout` or `vtai user disable` is
refused on its very next request:

- HTTP: 401 and the cookie cleared. Page loads, /login, /logout and /auth/config go on as
  for a visitor who is not signed in (the dead credential is removed from the request), so
  the browser lands on the login page instead of an error.
- socket.io: the connect is refused; an event on a socket already open is dropped and the
  socket disconnected.

Login attempts go through vtai_login_attempt() first: counted per name and per client
address in the database, so parallel guesses queue instead of all being checked at once
(rules in supabase/migrations/20261121000200_baseline.sql). A refused attempt does the
same hashing work and gets the same answer as a wrong password.

With a database URL (or the embedded Postgres) the functions are called directly; in
Supabase REST-only mode the same functions go over PostgREST with the service key.
"""

from __future__ import annotations

import contextvars
import inspect
import ipaddress
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

# The client address of the request being served (set by the middleware for every request);
# Chainlit's password_auth_callback gets only the name and password.
_client_addr: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "vtai_client_addr", default=None
)

# Paths whose answer doesn't depend on who asks beyond "not signed in": with a dead
# credential they are served as to a stranger. Everything else under these prefixes is API.
_API_PREFIXES = (
    "/user",
    "/project/",
    "/admin/api/",
    "/auth/",
    "/ws/",
    "/mcp",
    "/feedback",
    "/set-session-cookie",
)
_ANONYMOUS_OK = {("POST", "/login"), ("POST", "/logout"), ("GET", "/auth/config")}

REFUSED = -1.0


class SessionsUnavailable(Exception):
    """The session store can't be asked; str() is one line for the operator."""


# --- the store: the same SQL functions, directly or over REST ---------------------------


class PoolSessions:
    def __init__(self, pool):
        self.pool = pool

    async def start(self, user_id: uuid.UUID, ttl: int) -> uuid.UUID | None:
        return await self.pool.fetchval("select public.vtai_session_start($1, $2)", user_id, ttl)

    async def live(self, session_id: uuid.UUID, user_id: uuid.UUID) -> bool:
        return bool(
            await self.pool.fetchval("select public.vtai_session_live($1, $2)", session_id, user_id)
        )

    async def end(self, session_id: uuid.UUID) -> bool:
        # The audited twin (functions/70_retention.sql): the logout lands in audit_log too.
        return bool(
            await self.pool.fetchval("select public.vtai_session_end_audited($1)", session_id)
        )

    async def attempt(self, name: str, addr: str | None) -> float:
        return float(
            await self.pool.fetchval("select public.vtai_login_attempt($1, $2)", name, addr)
        )

    async def succeeded(self, name: str, addr: str | None) -> None:
        await self.pool.execute("select public.vtai_login_succeeded($1, $2)", name, addr)


class RestSessions:
    """The same functions over PostgREST (vtai.rest.store.SupabaseStore's client)."""

    def __init__(self, store):
        self.store = store

    async def _rpc(self, fn: str, params: dict) -> Any:
        try:
            return await self.store._rpc(fn, params)
        except Exception as exc:
            missing = "PGRST202" in str(exc) or "Could not find the function" in str(exc)
            hint = (
                "the project lacks the login-session functions (20261121000200_baseline.sql): run "
                "`python scripts/setup_supabase.py`"
                if missing
                else f"{type(exc).__name__}"
            )
            raise SessionsUnavailable(f"login sessions over Supabase REST failed ({hint})") from exc

    async def start(self, user_id: uuid.UUID, ttl: int) -> uuid.UUID | None:
        value = await self._rpc("vtai_session_start", {"p_user": str(user_id), "p_ttl": ttl})
        return uuid.UUID(str(value)) if value else None

    async def live(self, session_id: uuid.UUID, user_id: uuid.UUID) -> bool:
        params = {"p_session": str(session_id), "p_user": str(user_id)}
        return (await self._rpc("vtai_session_live", params)) is True

    async def end(self, session_id: uuid.UUID) -> bool:
        return (await self._rpc("vtai_session_end", {"p_session": str(session_id)})) is True

    async def attempt(self, name: str, addr: str | None) -> float:
        return float(await self._rpc("vtai_login_attempt", {"p_name": name, "p_addr": addr}))

    async def succeeded(self, name: str, addr: str | None) -> None:
        await self._rpc("vtai_login_succeeded", {"p_name": name, "p_addr": addr})


_store_for: tuple[int, Any] | None = None


def store():
    """The session store of the running services (built once per Services instance)."""
    global _store_for
    from vtai.ui.chat import services

    s = services()
    if _store_for is None or _store_for[0] != id(s):
        built = PoolSessions(s.db.pool) if s.db is not None else RestSessions(s.store)
        _store_for = (id(s), built)
    return _store_for[1]


def store_of(services) -> PoolSessions | RestSessions:
    if services.db is not None:
        return PoolSessions(services.db.pool)
    return RestSessions(services.store)


# --- logins ------------------------------------------------------------------------------


def client_address() -> str | None:
    """The address of the client whose request is being served (None outside a request)."""
    return _client_addr.get()


async def throttled(
    services,
    username: str,
    password: str,
    check: Callable[[str, str], Awaitable[Any]],
) -> Any:
    """check(username, password) behind the database's login throttle.

    Refused attempts burn the same hashing work as a real check and answer None, like a wrong
    password; the wait for a slot is the same whether the name exists or not.
    """
    from vtai.db import accounts

    # The name as the password check will read it (accounts.authenticate strips any Unicode
    # whitespace), so "alice\t" and "alice" share one throttle entry.
    name = (username or "").strip()
    gate = store_of(services)
    addr = client_address()
    try:
        wait = await gate.attempt(name, addr)
    except Exception as exc:
        log.error(
            "login refused: the login throttle can't be asked (%s)",
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
        )
        await accounts.burn_hash(password)
        return None
    if wait < 0:
        await accounts.burn_hash(password)
        return None
    if wait > 0:
        import asyncio

        await asyncio.sleep(wait)
    profile = await check(username, password)
    if profile is not None:
        try:
            await gate.succeeded(name, addr)
        except Exception as exc:  # the login stands; the counter just stays higher
            log.warning("login throttle reset failed (%s)", type(exc).__name__)
    return profile


async def login(username: str, password: str):
    """chat.login: check the password (throttled), start a server-side session, make the user."""
    import chainlit as cl

    from vtai.ui.chat import services

    s = services()
    profile = await s.authenticate(username, password)
    if profile is None:
        return None
    try:
        session_id = await store_of(s).start(profile.id, s.settings.session_ttl)
    except Exception as exc:
        log.error("login refused: the session can't be recorded (%s)", exc)
        return None
    if session_id is None:
        # Disabled between the password check and now (or the profile went away).
        return None
    return cl.User(
        identifier=profile.username,
        metadata={
            "id": str(profile.id),
            "tier": profile.tier,
            "is_admin": profile.is_admin,
            "sid": str(session_id),
        },
    )


# --- checking a credential ---------------------------------------------------------------


def _claims(token: str) -> tuple[uuid.UUID, uuid.UUID] | None:
    """(session id, user id) from a Chainlit JWT, or None if it is bad, expired or has none."""
    from chainlit.auth.jwt import decode_jwt

    try:
        user = decode_jwt(token)
        meta = user.metadata or {}
        return uuid.UUID(str(meta["sid"])), uuid.UUID(str(meta["id"]))
    except Exception:
        return None


async def token_live(token: str) -> bool:
    """Whether this token's login still holds. Raises if the store can't be asked."""
    claims = _claims(token)
    if claims is None:
        return False
    return await store().live(*claims)


def _cookie_token(cookies: dict[str, str]) -> str | None:
    from chainlit.auth import get_token_from_cookies

    return get_token_from_cookies(cookies)


# --- HTTP --------------------------------------------------------------------------------


def _in_networks(ip, networks) -> bool:
    return any(ip in net for net in networks)


def _ip(text: str | None):
    try:
        ip = ipaddress.ip_address((text or "").strip())
    except ValueError:
        return None
    return ip.ipv4_mapped or ip if ip.version == 6 else ip


def request_address(scope, trusted) -> str | None:
    """The client's address: the peer's, or from X-Forwarded-For when a trusted proxy sent it.

    X-Forwarded-For is read right to left, skipping trusted proxies; the first address that
    is not one is the client (what is left of it could be forged by the client).
    """
    peer = _ip((scope.get("client") or (None,))[0])
    if peer is None or not trusted or not _in_networks(peer, trusted):
        return str(peer) if peer is not None else None
    values = [v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"x-forwarded-for"]
    hops = [h for h in ",".join(values).split(",") if h.strip()]
    client = peer
    for hop in reversed(hops):
        ip = _ip(hop)
        if ip is None:
            break
        client = ip
        if not _in_networks(ip, trusted):
            break
    return str(client)


def _anonymous_ok(method: str, path: str) -> bool:
    if (method, path) in _ANONYMOUS_OK:
        return True
    return method in ("GET", "HEAD") and not path.startswith(_API_PREFIXES)


def _without_credentials(scope) -> dict:
    """The request with the auth cookies and Authorization header removed."""
    from chainlit.auth.cookie import _auth_cookie_name
    from starlette.requests import cookie_parser

    headers = []
    for key, value in scope["headers"]:
        if key == b"authorization":
            continue
        if key == b"cookie":
            kept = {
                k: v
                for k, v in cookie_parser(value.decode("latin-1")).items()
                if not k.startswith(_auth_cookie_name)
            }
            if not kept:
                continue
            value = "; ".join(f"{k}={v}" for k, v in kept.items()).encode("latin-1")
        headers.append((key, value))
    return {**scope, "headers": headers}


def _clear_cookie_headers(scope) -> list[tuple[bytes, bytes]]:
    from chainlit.auth.cookie import clear_auth_cookie
    from starlette.requests import Request
    from starlette.responses import Response

    response = Response()
    clear_auth_cookie(Request(scope), response)
    return [(k, v) for k, v in response.raw_headers if k == b"set-cookie"]


# The OpenAI-compatible API (vtai.api.routes): keys, not logins.
API_PREFIX = "/v1/"


class SessionMiddleware:
    """ASGI middleware: every HTTP request's credential must belong to a live login."""

    def __init__(self, app, settings=None, sio=None):
        self.app = app
        self.trusted = tuple(
            ipaddress.ip_network(n) for n in (settings.trusted_proxies if settings else ())
        )
        self.sio = sio

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        _client_addr.set(request_address(scope, self.trusted))
        from starlette.requests import Request

        if scope["path"].startswith(API_PREFIX):
            # The API authenticates each request by its key (vtai.api.keys), never a login.
            return await self.app(scope, receive, send)
        request = Request(scope)
        tokens = []
        if token := _cookie_token(request.cookies):
            tokens.append(token)
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            tokens.append(value.strip())
        if not tokens:
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        try:
            live = [await token_live(t) for t in tokens]
        except Exception as exc:
            log.error("sign-in check failed: %s", exc)
            return await _respond(scope, receive, send, 503, "The sign-in check is unavailable.")
        if all(live):
            if method == "POST" and path == "/logout":
                await self._end(tokens)
            return await self.app(scope, receive, send)
        if _anonymous_ok(method, path):
            clear = _clear_cookie_headers(scope)

            async def send_clearing(message):
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message.get("headers", []), *clear]}
                await send(message)

            return await self.app(_without_credentials(scope), receive, send_clearing)
        return await _respond(
            scope, receive, send, 401, "Your session has ended: sign in again.", clear=True
        )

    async def _end(self, tokens: list[str]) -> None:
        for token in tokens:
            claims = _claims(token)
            if claims is None:
                continue
            try:
                await store().end(claims[0])
            except Exception as exc:
                log.error("logout: the session could not be ended (%s)", exc)
            await _disconnect_session(self.sio, claims[0])


async def _respond(scope, receive, send, status: int, detail: str, clear: bool = False):
    from starlette.responses import JSONResponse

    response = JSONResponse({"detail": detail}, status_code=status)
    if clear:
        response.raw_headers.extend(_clear_cookie_headers(scope))
    await response(scope, receive, send)


# --- socket.io ---------------------------------------------------------------------------

# socket id -> (session id, user id) of the login that opened it.
_sockets: dict[str, tuple[uuid.UUID, uuid.UUID]] = {}


def _environ_token(environ) -> str | None:
    from starlette.requests import cookie_parser

    cookie = environ.get("HTTP_COOKIE")
    return _cookie_token(cookie_parser(cookie)) if cookie else None


async def _disconnect_session(sio, session_id: uuid.UUID) -> None:
    if sio is None:
        return
    for sid, (login, _) in list(_sockets.items()):
        if login == session_id:
            _sockets.pop(sid, None)
            try:
                await sio.disconnect(sid)
            except Exception:  # already gone
                pass


def _wrap_connect(original):
    async def connect(sid, environ, *rest):
        token = _environ_token(environ)
        if token is not None:
            claims = _claims(token)
            try:
                live = claims is not None and await store().live(*claims)
            except Exception as exc:
                log.error("sign-in check failed for a socket: %s", exc)
                live = False
            if not live:
                raise ConnectionRefusedError("session ended")
        result = original(sid, environ, *rest)
        if inspect.isawaitable(result):
            result = await result
        if result is not False and token is not None:
            _sockets[sid] = claims
        return result

    return connect


def _wrap_disconnect(original):
    async def disconnect(sid, *args):
        _sockets.pop(sid, None)
        result = original(sid, *args)
        return await result if inspect.isawaitable(result) else result

    return disconnect


def _wrap_event(sio, event: str, original):
    async def handler(sid, *args):
        claims = _sockets.get(sid)
        try:
            live = claims is not None and await store().live(*claims)
        except Exception as exc:
            log.error("sign-in check failed for socket event %s: %s", event, exc)
            live = False
        if not live:
            log.info("socket event %r dropped: its login has ended", event)
            _sockets.pop(sid, None)
            await sio.disconnect(sid)
            return None
        result = original(sid, *args)
        return await result if inspect.isawaitable(result) else result

    return handler


def install(app, sio, settings) -> None:
    """Called once from vtai/main.py with Chainlit's FastAPI app and socket.io server."""
    from chainlit.config import config
    from starlette.middleware import Middleware

    # Chainlit's JWT and cookie last no longer than the server-side session.
    config.project.user_session_timeout = min(
        config.project.user_session_timeout, settings.session_ttl
    )
    # Innermost of the app's middleware: its 401s still get CORS and security headers.
    app.user_middleware.append(Middleware(SessionMiddleware, settings=settings, sio=sio))
    handlers = sio.handlers.setdefault("/", {})
    for event, original in list(handlers.items()):
        if event == "connect":
            handlers[event] = _wrap_connect(original)
        elif event == "disconnect":
            handlers[event] = _wrap_disconnect(original)
        else:
            handlers[event] = _wrap_event(sio, event, original)
    if "connect" not in handlers:
        log.warning("no socket.io connect handler at install: socket logins are not checked")


def _jwt_unverified(token: str) -> dict:
    """A token's claims without checking it (for tests and diagnostics only)."""
    import jwt

    return jwt.decode(token, options={"verify_signature": False})


def _claims_unverified(token: str) -> tuple[uuid.UUID, uuid.UUID]:
    meta = _jwt_unverified(token)["metadata"]
    return uuid.UUID(meta["sid"]), uuid.UUID(meta["id"])
