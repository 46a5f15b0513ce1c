"""A STAND-IN for PostgREST's RPC endpoint, for tests only. It is not PostgREST.

PostgREST can't be installed here, so this small aiohttp app does the part of it that the
Supabase client's `rpc()` uses, the way PostgREST does it: POST /rest/v1/rpc/<fn> with JSON
named arguments; verify the HS256 JWT in Authorization (no token means the anon role); in one
transaction `set local role` to the JWT's role and set `request.jwt.claims`; call the real
function in the real Postgres; answer a JSON array for set-returning functions or the scalar
otherwise; map errors to PostgREST's status codes and {code, message, details, hint} body.
So what is tested is the real SQL and the real grants, reached the way Supabase reaches them.
"""

from __future__ import annotations

import json

import asyncpg
import jwt
from aiohttp import web

SECRET = "test-jwt-secret-at-least-32-characters-long"
ROLES = ("anon", "authenticated", "service_role")


def token(role: str, secret: str = SECRET, **claims) -> str:
    return jwt.encode({"role": role, "iss": "supabase", **claims}, secret, algorithm="HS256")


def _error(status: int, code: str, message: str, details=None, hint=None) -> web.Response:
    body = {"code": code, "message": message, "details": details, "hint": hint}
    return web.json_response(body, status=status)


def _status_for(sqlstate: str, role: str) -> int:
    # PostgREST: permission denied is 401 for the anonymous role, 403 for a signed-in one.
    if sqlstate == "42501":
        return 401 if role == "anon" else 403
    if sqlstate.startswith("23"):
        return 409
    if sqlstate.startswith(("22", "P0", "42")):
        return 400
    return 500


class FakePostgrest:
    def __init__(self, db_url: str, secret: str = SECRET):
        self.db_url = db_url
        self.secret = secret
        self.pool: asyncpg.Pool | None = None
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> FakePostgrest:
        self.pool = await asyncpg.create_pool(self.db_url, min_size=1, max_size=4)
        app = web.Application()
        app.router.add_post("/rest/v1/rpc/{fn}", self.rpc)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        if self.pool is not None:
            await self.pool.close()

    def _claims(self, request: web.Request) -> dict | web.Response:
        header = request.headers.get("Authorization", "")
        if not header:
            return {"role": "anon"}
        scheme, _, raw = header.partition(" ")
        if scheme.lower() != "bearer":
            return _error(401, "PGRST301", "Expected a Bearer token")
        try:
            claims = jwt.decode(
                raw, self.secret, algorithms=["HS256"], options={"verify_aud": False}
            )
        except jwt.PyJWTError as exc:
            return _error(401, "PGRST301", f"JWT invalid: {exc}")
        if claims.get("role", "anon") not in ROLES:
            return _error(401, "PGRST301", "JWT role is not allowed")
        return claims

    async def rpc(self, request: web.Request) -> web.Response:
        claims = self._claims(request)
        if isinstance(claims, web.Response):
            return claims
        role = claims.get("role", "anon")
        fn = request.match_info["fn"]
        try:
            args = await request.json()
        except json.JSONDecodeError:
            return _error(400, "PGRST102", "Empty or invalid json")
        async with self.pool.acquire() as conn:
            proc = await conn.fetchrow(
                "select p.proretset, p.proargnames,"
                " array(select format_type(t, null) from unnest(p.proargtypes) t) as types"
                " from pg_proc p where p.pronamespace = 'public'::regnamespace"
                " and p.proname = $1",
                fn,
            )
            if proc is None:
                return _error(404, "PGRST202", f"Could not find the function public.{fn}")
            # Input arguments come first in proargnames (TABLE columns follow them).
            names = list(proc["proargnames"] or [])[: len(proc["types"])]
            unknown = set(args) - set(names)
            if unknown:
                return _error(404, "PGRST202", f"no public.{fn} with arguments {sorted(unknown)}")
            # Named notation, each argument cast from the JSON body, as PostgREST builds it.
            call = ", ".join(
                f"{name} => ($1::jsonb -> '{name}')"
                if typ in ("jsonb", "json")
                else f"{name} => ($1::jsonb ->> '{name}')::{typ}"
                for name, typ in zip(names, proc["types"], strict=True)
                if name in args
            )
            sql = (
                f"select coalesce(json_agg(t), '[]') from public.{fn}({call}) t"
                if proc["proretset"]
                else f"select to_json(public.{fn}({call}))"
            )
            try:
                async with conn.transaction():
                    await conn.execute(f"set local role {role}")
                    await conn.execute(
                        "select set_config('request.jwt.claims', $1, true)", json.dumps(claims)
                    )
                    result = await conn.fetchval(sql, json.dumps(args))
            except asyncpg.PostgresError as exc:
                return _error(
                    _status_for(exc.sqlstate or "", role),
                    exc.sqlstate or "",
                    str(exc),
                    getattr(exc, "detail", None),
                    getattr(exc, "hint", None),
                )
        return web.Response(text=result, content_type="application/json")
