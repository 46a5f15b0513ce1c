"""Row-level security and the user-level roles' privileges, as the migrations intend them.

On Supabase, PostgREST serves every table in `public` to whoever holds the project's anon key
(`anon`) and to signed-in users (`authenticated`). The server itself connects as the tables'
owner or as service_role, which bypass RLS, so a table left open never shows in the app: only a
check like this finds it. What the migrations intend (each revokes Supabase's default grants):

- RLS is on for every table in public and vtai_private;
- anon holds no privilege on any of their tables or sequences, and no policy is for anon or
  PUBLIC;
- authenticated may read some public tables (a policy narrows it to their own rows) and write
  none; vtai_private (the password hashes) is nobody's but the server's;
- no SECURITY DEFINER function there is executable by anon or authenticated unless the
  migrations grant it (today: none).

`problems()` is the one statement of these rules: `vtai doctor` runs it, and so can tests.
"""

from __future__ import annotations

import asyncpg

SCHEMAS = ["public", "vtai_private"]
USER_ROLES = ["anon", "authenticated"]

_TABLES = """
select format('%I.%I', n.nspname, c.relname) as name, c.oid, n.nspname as schema,
       c.relrowsecurity as rls
from pg_class c join pg_namespace n on n.oid = c.relnamespace
where n.nspname = any($1::text[]) and c.relkind in ('r', 'p')
order by 1
"""

_OPEN_POLICIES = """
select format('%I.%I', schemaname, tablename) as name, policyname, cmd, roles::text[] as roles
from pg_policies
where schemaname = any($1::text[]) and roles && array['anon', 'public']::name[]
order by 1, 2
"""

# What each role holds on each table: column-level grants count (has_any_column_privilege).
_TABLE_GRANTS = """
select format('%I.%I', n.nspname, c.relname) as name, r.rolname as role,
       array_remove(array[
         case when has_any_column_privilege(r.oid, c.oid, 'select') then 'select' end,
         case when has_any_column_privilege(r.oid, c.oid, 'insert') then 'insert' end,
         case when has_any_column_privilege(r.oid, c.oid, 'update') then 'update' end,
         case when has_table_privilege(r.oid, c.oid, 'delete') then 'delete' end,
         case when has_table_privilege(r.oid, c.oid, 'truncate') then 'truncate' end,
         case when has_any_column_privilege(r.oid, c.oid, 'references') then 'references' end,
         case when has_table_privilege(r.oid, c.oid, 'trigger') then 'trigger' end
       ], null) as privileges,
       n.nspname as schema
from pg_class c join pg_namespace n on n.oid = c.relnamespace
cross join pg_roles r
where n.nspname = any($1::text[]) and c.relkind in ('r', 'p', 'v', 'm', 'f')
  and r.rolname = any($2::text[])
order by 1, 2
"""

_SEQUENCE_GRANTS = """
select format('%I.%I', n.nspname, c.relname) as name, r.rolname as role
from pg_class c join pg_namespace n on n.oid = c.relnamespace
cross join pg_roles r
where n.nspname = any($1::text[]) and c.relkind = 'S' and r.rolname = any($2::text[])
  and has_sequence_privilege(r.oid, c.oid, 'usage,select,update')
order by 1, 2
"""

_DEFINER_FUNCTIONS = """
select p.oid::regprocedure::text as name, r.rolname as role
from pg_proc p join pg_namespace n on n.oid = p.pronamespace
cross join pg_roles r
where n.nspname = any($1::text[]) and p.prosecdef and r.rolname = any($2::text[])
  and has_function_privilege(r.oid, p.oid, 'execute')
order by 1, 2
"""

_PRIVATE_SCHEMA = """
select r.rolname as role from pg_roles r
where r.rolname = any($1::text[]) and has_schema_privilege(r.oid, 'vtai_private', 'usage')
"""


async def problems(conn: asyncpg.Connection | asyncpg.Pool) -> list[str]:
    """Every way the database departs from the rules above, one short line each (none: ok)."""
    found: list[str] = []
    for t in await conn.fetch(_TABLES, SCHEMAS):
        if not t["rls"]:
            found.append(f"row-level security is off on {t['name']}")
    for p in await conn.fetch(_OPEN_POLICIES, SCHEMAS):
        found.append(
            f'policy "{p["policyname"]}" on {p["name"]} lets {", ".join(p["roles"])}'
            f" {p['cmd'].lower()}"
        )
    for g in await conn.fetch(_TABLE_GRANTS, SCHEMAS, USER_ROLES):
        held = list(g["privileges"])
        if g["role"] == "authenticated" and g["schema"] == "public":
            held = [p for p in held if p != "select"]  # RLS narrows reads to their own rows
        if held:
            found.append(f"{g['role']} may {', '.join(held)} {g['name']}")
    for s in await conn.fetch(_SEQUENCE_GRANTS, SCHEMAS, USER_ROLES):
        found.append(f"{s['role']} may use the sequence {s['name']}")
    for f in await conn.fetch(_DEFINER_FUNCTIONS, SCHEMAS, USER_ROLES):
        found.append(f"{f['role']} may execute {f['name']} (security definer)")
    if await conn.fetchval("select to_regnamespace('vtai_private')") is not None:
        for r in await conn.fetch(_PRIVATE_SCHEMA, USER_ROLES):
            found.append(f"{r['role']} may use the schema vtai_private")
    return found
