"""A STAND-IN for Supabase Auth (GoTrue) password sign-in, for tests only. It is not GoTrue.

GoTrue can't be installed here, so this small aiohttp app answers the one call the Supabase
client's `auth.sign_in_with_password` makes, the way GoTrue answers it:
POST /auth/v1/token?grant_type=password with {"email", "password"}.

- The user's id comes from the test database's real `auth.users`, looked up by email.
- The password is checked against an argon2 hash that this stand-in keeps in memory, set with
  `set_password`. GoTrue keeps a bcrypt hash in auth.users.encrypted_password, but the compat
  migration's minimal auth.users has no such column, and migrations don't change for a test.
- Success is GoTrue's session JSON with an access token signed with the PostgREST stand-in's
  secret (role authenticated, sub = the user's id), so the token is one PostgREST would accept.
- A wrong password or unknown email is GoTrue's 400 {"code": "invalid_credentials"}.
- Under /down/ every call answers 503, as a gateway does when the auth service is down.
"""

from __future__ import annotations

import secrets
import time
import uuid

import asyncpg
from aiohttp import web
from argon2 import PasswordHasher
from argon2.exceptions import VerificationError

from tests.background_server import BackgroundServer
from tests.fake_postgrest import SECRET, token

_hasher = PasswordHasher()
API_VERSION = {"X-Supabase-Api-Version": "2024-01-01"}


def _refused(status: int, code: str, message: str) -> web.Response:
    body = {"code": code, "error_code": code, "msg": message}
    return web.json_response(body, status=status, headers=API_VERSION)


class FakeGotrue(BackgroundServer):
    def __init__(self, db_url: str, secret: str = SECRET):
        super().__init__()
        self.db_url = db_url
        self.secret = secret
        self.hashes: dict[str, str] = {}
        self.sign_ins = 0

    def set_password(self, email: str, password: str) -> None:
        self.hashes[email.lower()] = _hasher.hash(password)

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/auth/v1/token", self.token)
        app.router.add_post("/down/auth/v1/token", self.down)
        return app

    async def down(self, request: web.Request) -> web.Response:
        return web.Response(status=503, text="upstream unavailable")

    async def token(self, request: web.Request) -> web.Response:
        self.sign_ins += 1
        if request.query.get("grant_type") != "password":
            return _refused(400, "validation_failed", "unsupported grant_type")
        body = await request.json()
        email = str(body.get("email") or "").strip().lower()
        conn = await asyncpg.connect(self.db_url)
        try:
            row = await conn.fetchrow(
                "select id, email, created_at from auth.users where lower(email) = $1", email
            )
        finally:
            await conn.close()
        stored = self.hashes.get(email)
        try:
            ok = row is not None and stored is not None
            ok = _hasher.verify(stored, str(body.get("password") or "")) and ok
        except (VerificationError, TypeError):
            ok = False
        if not ok:
            return _refused(400, "invalid_credentials", "Invalid login credentials")
        now = int(time.time())
        user = {
            "id": str(row["id"]),
            "aud": "authenticated",
            "role": "authenticated",
            "email": row["email"],
            "app_metadata": {"provider": "email", "providers": ["email"]},
            "user_metadata": {},
            "created_at": row["created_at"].isoformat(),
        }
        session = {
            "access_token": token(
                "authenticated",
                self.secret,
                sub=user["id"],
                email=row["email"],
                aud="authenticated",
                exp=now + 3600,
            ),
            "token_type": "bearer",
            "expires_in": 3600,
            "expires_at": now + 3600,
            "refresh_token": secrets.token_urlsafe(16),
            "user": user,
        }
        return web.json_response(session, headers=API_VERSION)


async def add_auth_user(conn: asyncpg.Connection, gotrue: FakeGotrue, password: str) -> str:
    """A Supabase Auth user: a real auth.users row, its password known to the stand-in."""
    email = f"u{uuid.uuid4().hex[:8]}@example.com"
    await conn.execute("insert into auth.users (email) values ($1)", email)
    gotrue.set_password(email, password)
    return email
