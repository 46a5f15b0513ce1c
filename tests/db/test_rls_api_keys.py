"""API keys under row-level security, on a database shaped like a Supabase project and migrated
by a role that is no superuser: a signed-in user reads only their own keys' metadata and never
the hash; anon reads nothing; only the service role may look a key up."""

from __future__ import annotations

import json
import uuid

import asyncpg
import pytest

from tests.db.test_migrations import supabase_db  # noqa: F401 (a fixture)
from vtai.api import keys
from vtai.db import accounts, migrations

COLUMNS = ("id", "user_id", "label", "prefix", "created_at", "last_used_at", "expires_at")


async def as_role(conn, role: str, user_id: uuid.UUID | None = None) -> None:
    claims = {"role": role} | ({"sub": str(user_id)} if user_id else {})
    await conn.execute(f"set local role {role}")
    await conn.execute("select set_config('request.jwt.claims', $1, true)", json.dumps(claims))


@pytest.fixture
async def migrated(supabase_db):  # noqa: F811
    su_url, migrator_url = supabase_db
    migrator = await asyncpg.connect(migrator_url)
    try:
        assert not await migrator.fetchval(
            "select rolsuper from pg_roles where rolname = current_user"
        )
        await migrations.apply_pending(migrator)
        ada = await accounts.create_user(migrator, "ada", "correct horse battery")
        bob = await accounts.create_user(migrator, "bob", "correct horse battery")
        made = {}
        for user in (ada, bob):
            made[user.username] = await keys.create(migrator, user.id, "k", actor="test")
    finally:
        await migrator.close()
    su = await asyncpg.connect(su_url)
    yield su, ada, bob, made
    await su.close()


async def test_a_user_reads_only_their_own_keys_metadata(migrated):
    su, ada, bob, made = migrated
    async with su.transaction():
        await as_role(su, "authenticated", ada.id)
        rows = await su.fetch(f"select {', '.join(COLUMNS)}, revoked_at from public.api_keys")
        assert [(r["id"], r["user_id"]) for r in rows] == [(made["ada"][0].id, ada.id)]
        # asking for another user's key by id finds nothing
        assert (
            await su.fetchval(
                "select count(*) from public.api_keys where id = $1", made["bob"][0].id
            )
            == 0
        )


REFUSED = (
    "select key_hash from public.api_keys",
    "select * from public.api_keys",
    "select count(*) from public.api_keys where key_hash = 'x'",
    "insert into public.api_keys (user_id, label, prefix, key_hash)"
    " values ($1, 'x', 'vtai-x', repeat('a', 64))",
    "update public.api_keys set revoked_at = null where user_id = $1",
    "update public.api_keys set expires_at = null where user_id = $1",
    "delete from public.api_keys where user_id = $1",
    "select * from public.vtai_api_key_owner(repeat('a', 64))",
)


async def test_never_the_hash_nor_a_change_nor_a_lookup(migrated):
    su, ada, _, _ = migrated
    # One database for every case (each migrates from nothing): a transaction per statement.
    for role in ("authenticated", "anon"):
        for statement in REFUSED:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                async with su.transaction():
                    await as_role(su, role, ada.id if role == "authenticated" else None)
                    await su.execute(statement, *([ada.id] if "$1" in statement else []))
    assert await su.fetchval("select count(*) from public.api_keys where revoked_at is null") == 2


async def test_anon_reads_nothing_and_the_grants_say_so(migrated):
    su, *_ = migrated
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with su.transaction():
            await as_role(su, "anon")
            await su.fetch("select id, label from public.api_keys")
    for column in (*COLUMNS, "revoked_at", "key_hash"):
        assert not await su.fetchval(
            "select has_column_privilege('anon', 'public.api_keys', $1, 'select')", column
        )
        readable = await su.fetchval(
            "select has_column_privilege('authenticated', 'public.api_keys', $1, 'select')",
            column,
        )
        assert readable == (column != "key_hash"), column
    for priv in ("insert", "update", "delete", "truncate", "references", "trigger"):
        for role in ("anon", "authenticated"):
            assert not await su.fetchval(
                "select has_table_privilege($1, 'public.api_keys', $2)", role, priv
            ), (role, priv)
    fn = "public.vtai_api_key_owner(text)"
    for role in ("anon", "authenticated"):
        assert not await su.fetchval("select has_function_privilege($1, $2, 'execute')", role, fn)
    assert await su.fetchval("select has_function_privilege('service_role', $1, 'execute')", fn)
    assert await su.fetchval(
        "select relrowsecurity from pg_class where oid = 'public.api_keys'::regclass"
    )


async def test_the_service_role_looks_a_key_up(migrated):
    su, ada, _, made = migrated
    key, plain = made["ada"]
    async with su.transaction():
        await as_role(su, "service_role")
        row = await su.fetchrow("select * from public.vtai_api_key_owner($1)", keys.hash_key(plain))
    assert (row["key_id"], row["user_id"], row["label"]) == (key.id, ada.id, "k")
