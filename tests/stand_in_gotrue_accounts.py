"""A STAND-IN for Supabase Auth (GoTrue) sign-up, recovery and password change, for tests only.
It is not GoTrue.

tests/fake_gotrue.py answers the password grant; this subclass adds the calls vtai.accounts
makes, answering as GoTrue does (with email confirmation off, "autoconfirm"):

- POST /auth/v1/signup {email, password}: a real auth.users row and the password; GoTrue's
  session JSON. An email already there: 422 {"code": "user_already_exists"}.
- POST /auth/v1/recover {email}, ?redirect_to: 200 {} whether or not the email exists; for a
  known one the "mail" GoTrue would send is kept in `recoveries` (email, token_hash,
  redirect_to) instead of being sent.
- POST /auth/v1/verify {type: recovery, token_hash}: a session for that user, once; unknown
  or used: 403 {"code": "otp_expired"}.
- PUT /auth/v1/user {password} with a user's access token (signed with the PostgREST
  stand-in's secret): sets the password; a bad token is 401.

Every call is appended to `calls` as (method, path, json body without passwords).
"""

from __future__ import annotations

import secrets
import time

import asyncpg
import jwt
from aiohttp import web

from tests.fake_gotrue import API_VERSION, FakeGotrue, _refused
from tests.fake_postgrest import FakePostgrest, token


class GotrueAccounts(FakeGotrue):
    def __init__(self, db_url: str, **kwargs):
        super().__init__(db_url, **kwargs)
        self.calls: list[tuple[str, str, dict]] = []
        self.recoveries: list[dict] = []
        self._recovery: dict[str, str] = {}  # token_hash -> email

    def add_routes(self, app: web.Application) -> None:
        """The account calls, on this server or on the PostgREST stand-in's (RestWithAccounts)."""
        app.router.add_post("/auth/v1/signup", self.signup)
        app.router.add_post("/auth/v1/recover", self.recover)
        app.router.add_post("/auth/v1/verify", self.verify)
        app.router.add_put("/auth/v1/user", self.update_user)

    def build_app(self) -> web.Application:
        app = super().build_app()
        self.add_routes(app)
        return app

    async def _body(self, request: web.Request) -> dict:
        body = await request.json()
        shown = {k: v for k, v in body.items() if k != "password"}
        self.calls.append((request.method, request.path, {**shown, **request.query}))
        return body

    async def _user(self, email: str):
        conn = await asyncpg.connect(self.db_url)
        try:
            return await conn.fetchrow(
                "select id, email, created_at from auth.users where lower(email) = $1", email
            )
        finally:
            await conn.close()

    def _session(self, row) -> dict:
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
        access = token(
            "authenticated",
            self.secret,
            sub=user["id"],
            email=row["email"],
            aud="authenticated",
            exp=now + 3600,
        )
        return {
            "access_token": access,
            "token_type": "bearer",
            "expires_in": 3600,
            "expires_at": now + 3600,
            "refresh_token": secrets.token_urlsafe(16),
            "user": user,
        }

    async def signup(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        email = str(body.get("email") or "").strip().lower()
        password = str(body.get("password") or "")
        if len(password) < 6:
            return _refused(422, "weak_password", "Password should be at least 6 characters.")
        conn = await asyncpg.connect(self.db_url)
        try:
            row = await conn.fetchrow(
                "insert into auth.users (email) values ($1) on conflict do nothing"
                " returning id, email, created_at",
                email,
            )
        finally:
            await conn.close()
        if row is None:
            return _refused(422, "user_already_exists", "User already registered")
        self.set_password(email, password)
        return web.json_response(self._session(row), headers=API_VERSION)

    async def recover(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        email = str(body.get("email") or "").strip().lower()
        if await self._user(email) is not None:
            token_hash = secrets.token_hex(28)
            self._recovery[token_hash] = email
            self.recoveries.append(
                {
                    "email": email,
                    "token_hash": token_hash,
                    "redirect_to": request.query.get("redirect_to"),
                }
            )
        return web.json_response({}, headers=API_VERSION)

    async def verify(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        email = self._recovery.pop(str(body.get("token_hash") or ""), None)
        if body.get("type") != "recovery" or email is None:
            return _refused(403, "otp_expired", "Email link is invalid or has expired")
        return web.json_response(self._session(await self._user(email)), headers=API_VERSION)

    async def update_user(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        try:
            claims = jwt.decode(value, self.secret, algorithms=["HS256"], audience="authenticated")
        except jwt.PyJWTError:
            return _refused(401, "bad_jwt", "invalid JWT")
        row = await self._user(str(claims.get("email") or "").lower())
        if scheme.lower() != "bearer" or row is None:
            return _refused(401, "bad_jwt", "invalid JWT")
        self.set_password(row["email"], str(body.get("password") or ""))
        return web.json_response(self._session(row)["user"], headers=API_VERSION)


class RestWithAccounts(FakePostgrest):
    """The PostgREST stand-in (tests/fake_postgrest.py) serving a GotrueAccounts under /auth/v1
    too, so one SUPABASE_URL reaches both, as on a Supabase project (REST-only metering)."""

    def __init__(self, db_url: str, auth: GotrueAccounts):
        super().__init__(db_url, auth=auth)

    async def start(self, port: int = 0) -> RestWithAccounts:
        # FakePostgrest.start with the account routes added (it builds its app inline).
        self.pool = await asyncpg.create_pool(self.db_url, min_size=1, max_size=4)
        app = web.Application()
        app.router.add_post("/rest/v1/rpc/{fn}", self.rpc)
        app.router.add_get("/rest/v1/{table}", self.select)
        app.router.add_post("/rest/v1/{table}", self.insert)
        app.router.add_post("/auth/v1/token", self.auth.token)
        self.auth.add_routes(app)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        return self
