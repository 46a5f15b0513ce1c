"""A STAND-IN for PostgREST's RPC and table endpoints, for tests only. It is not PostgREST.

PostgREST can't be installed here, so this small aiohttp app does the part of it that the
Supabase client's `rpc()` and `table()` use, the way PostgREST does it: POST /rest/v1/rpc/<fn>
with JSON named arguments; GET /rest/v1/<table> with select, eq/neq/gt/gte/lt/lte filters,
order, limit and offset; POST /rest/v1/<table> to insert. It verifies the HS256 JWT in
Authorization (no token means the anon role); in one transaction `set local role` to the JWT's
role and sets `request.jwt.claims`; runs the real function or statement in the real Postgres;
answers a JSON array for set-returning functions and table reads, or the scalar otherwise;
maps errors to PostgREST's status codes and {code, message, details, hint} body. So what is
tested is the real SQL, the real grants and the real RLS, reached the way Supabase reaches
them. `start(port=...)` lets a test stop it and bring it back on the same address.

Given `auth` (a tests.fake_gotrue.FakeGotrue), it also serves that stand-in's sign-in under
/auth/v1, so one SUPABASE_URL reaches both, as on a Supabase project.
"""

from __future__ import annotations

import json
import re

import asyncpg
import jwt
from aiohttp import web

SECRET = "test-jwt-secret-at-least-32-characters-long"
ROLES = ("anon", "authenticated", "service_role")
_IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")
_OPERATORS = {"eq": "=", "neq": "<>", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
# Query parameters that are not column filters.
_RESERVED = {"select", "order", "limit", "offset", "columns", "on_conflict"}


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
    def __init__(self, db_url: str, secret: str = SECRET, auth=None):
        self.db_url = db_url
        self.secret = secret
        self.auth = auth
        self.pool: asyncpg.Pool | None = None
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self, port: int = 0) -> FakePostgrest:
        self.pool = await asyncpg.create_pool(self.db_url, min_size=1, max_size=4)
        app = web.Application()
        app.router.add_post("/rest/v1/rpc/{fn}", self.rpc)
        app.router.add_get("/rest/v1/{table}", self.select)
        app.router.add_post("/rest/v1/{table}", self.insert)
        if self.auth is not None:
            app.router.add_post("/auth/v1/token", self.auth.token)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

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

    async def _claims_and_body(self, request: web.Request) -> tuple[dict, object] | web.Response:
        claims = self._claims(request)
        if isinstance(claims, web.Response):
            return claims
        try:
            return claims, await request.json()
        except json.JSONDecodeError:
            return _error(400, "PGRST102", "Empty or invalid json")

    async def rpc(self, request: web.Request) -> web.Response:
        got = await self._claims_and_body(request)
        if isinstance(got, web.Response):
            return got
        claims, args = got
        fn = request.match_info["fn"]
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
            return await _as_role(conn, claims, sql, json.dumps(args))

    async def _columns(self, conn: asyncpg.Connection, table: str) -> dict[str, str] | None:
        rows = await conn.fetch(
            "select a.attname, format_type(a.atttypid, a.atttypmod) as type"
            " from pg_attribute a where a.attrelid = to_regclass('public.' || $1)"
            " and a.attnum > 0 and not a.attisdropped",
            table,
        )
        return {r["attname"]: r["type"] for r in rows} or None

    async def select(self, request: web.Request) -> web.Response:
        claims = self._claims(request)
        if isinstance(claims, web.Response):
            return claims
        table = request.match_info["table"]
        query = request.query
        async with self.pool.acquire() as conn:
            columns = await self._columns(conn, table) if _IDENT.match(table) else None
            if columns is None:
                return _error(404, "42P01", f'relation "public.{table}" does not exist')
            wanted = [c.strip() for c in query.get("select", "*").split(",")]
            if any(c != "*" and c not in columns for c in wanted):
                return _error(400, "42703", f"column not found in {wanted}")
            where, args = [], []
            for key, value in query.items():
                if key in _RESERVED:
                    continue
                op, _, literal = value.partition(".")
                if key not in columns or op not in _OPERATORS:
                    return _error(400, "PGRST100", f"unsupported filter {key}={value}")
                args.append(literal)
                where.append(f"{key} {_OPERATORS[op]} cast(${len(args)}::text as {columns[key]})")
            order = []
            for term in filter(None, query.get("order", "").split(",")):
                column, _, direction = term.partition(".")
                if column not in columns or direction not in ("", "asc", "desc"):
                    return _error(400, "PGRST100", f"unsupported order {term}")
                order.append(f"{column} {direction or 'asc'}")
            sql = f"select {', '.join(wanted)} from public.{table}"
            if where:
                sql += " where " + " and ".join(where)
            if order:
                sql += " order by " + ", ".join(order)
            for clause in ("limit", "offset"):
                if query.get(clause, "").isdigit():
                    sql += f" {clause} {int(query[clause])}"
            sql = f"select coalesce(json_agg(t), '[]') from ({sql}) t"
            return await _as_role(conn, claims, sql, *args)

    async def insert(self, request: web.Request) -> web.Response:
        got = await self._claims_and_body(request)
        if isinstance(got, web.Response):
            return got
        claims, body = got
        table = request.match_info["table"]
        rows = body if isinstance(body, list) else [body]
        async with self.pool.acquire() as conn:
            columns = await self._columns(conn, table) if _IDENT.match(table) else None
            if columns is None:
                return _error(404, "42P01", f'relation "public.{table}" does not exist')
            given = sorted({key for row in rows for key in row})
            if not given or any(c not in columns for c in given):
                return _error(400, "PGRST204", f"unknown columns in {given}")
            names = ", ".join(given)
            sql = (
                f"with ins as (insert into public.{table} ({names}) select {names}"
                f" from json_populate_recordset(null::public.{table}, $1::json) returning *)"
                " select coalesce(json_agg(ins), '[]') from ins"
            )
            minimal = "return=minimal" in request.headers.get("Prefer", "")
            response = await _as_role(conn, claims, sql, json.dumps(rows), status=201)
        if minimal and response.status == 201:
            return web.Response(status=201)
        return response


async def _as_role(
    conn: asyncpg.Connection, claims: dict, sql: str, *args, status: int = 200
) -> web.Response:
    """Run one statement as PostgREST would: the JWT's role, its claims, one transaction."""
    role = claims.get("role", "anon")
    try:
        async with conn.transaction():
            await conn.execute(f"set local role {role}")
            await conn.execute(
                "select set_config('request.jwt.claims', $1, true)", json.dumps(claims)
            )
            result = await conn.fetchval(sql, *args)
    except asyncpg.PostgresError as exc:
        return _error(
            _status_for(exc.sqlstate or "", role),
            exc.sqlstate or "",
            str(exc),
            getattr(exc, "detail", None),
            getattr(exc, "hint", None),
        )
    return web.Response(text=result, status=status, content_type="application/json")
