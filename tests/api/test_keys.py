"""Personal API keys (vtai.api.keys) on a real Postgres: made, listed, revoked, audited; only
the hash stored; owner() refuses revoked, expired, disabled-user and deleted-user keys, and
asks the same SQL function over REST in REST-only mode."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import asyncpg
import pytest

from tests.conftest import add_user
from tests.fake_postgrest import FakePostgrest, token
from vtai.api import keys
from vtai.db import accounts
from vtai.rest.store import SupabaseStore


@pytest.fixture
async def pool(db_url):
    p = await asyncpg.create_pool(db_url, min_size=1, max_size=4)
    yield p
    await p.close()


def direct(pool) -> SimpleNamespace:
    """What owner() reads of vtai.services.Services with a database URL."""
    return SimpleNamespace(db=SimpleNamespace(pool=pool, gate_pool=pool), store=None)


async def make(conn, user, label="laptop", expires_at=None):
    return await keys.create(conn, user.id, label, expires_at, actor=user.username)


async def test_create_list_revoke(conn):
    ada, bob = await add_user(conn, "ada"), await add_user(conn, "bob")
    key, plain = await make(conn, ada)
    assert keys.well_formed(plain) and len(plain) == len("vtai-") + 43
    assert key.prefix == plain[:12] and key.label == "laptop" and key.username == "ada"
    assert key.state() == "active" and key.last_used_at is None and key.expires_at is None
    stored = await conn.fetchrow("select * from api_keys where id = $1", key.id)
    assert stored["key_hash"] == hashlib.sha256(plain.encode()).hexdigest()
    other, other_plain = await make(conn, bob, "ci", datetime.now(UTC) + timedelta(days=3))
    assert other_plain != plain and other.expires_at is not None

    assert [k.id for k in await keys.list_keys(conn, ada.id)] == [key.id]
    assert {k.id for k in await keys.list_keys(conn)} == {key.id, other.id}

    # bob can't revoke ada's key: it is not found, as if it did not exist
    with pytest.raises(keys.KeyNotFound):
        await keys.revoke(conn, key.id, bob.id, actor="bob")
    revoked, changed = await keys.revoke(conn, key.id, ada.id, actor="ada")
    assert changed and revoked.state() == "revoked" and revoked.revoked_at is not None
    again, changed = await keys.revoke(conn, key.id, ada.id, actor="ada")
    assert not changed and again.revoked_at == revoked.revoked_at
    # an admin (no user given) revokes anyone's
    _, changed = await keys.revoke(conn, other.id, actor="boss")
    assert changed
    with pytest.raises(keys.KeyNotFound):
        await keys.revoke(conn, uuid.uuid4(), actor="boss")

    trail = await conn.fetch(
        "select actor, action, target, before::text, after::text from audit_log order by id"
    )
    assert [(r["actor"], r["action"], r["target"]) for r in trail] == [
        ("ada", "key.create", f"ada/{key.prefix}"),
        ("bob", "key.create", f"bob/{other.prefix}"),
        ("ada", "key.revoke", f"ada/{key.prefix}"),
        ("boss", "key.revoke", f"bob/{other.prefix}"),
    ]
    for r in trail:
        text = f"{r['before']} {r['after']}"
        assert plain[5:] not in text and other_plain[5:] not in text
        assert stored["key_hash"] not in text


async def test_the_plain_key_is_stored_nowhere(conn, pool, caplog):
    caplog.set_level(logging.DEBUG)
    ada = await add_user(conn, "ada")
    key, plain = await make(conn, ada)
    assert await keys.owner(direct(pool), plain) is not None
    await keys.revoke(conn, key.id, actor="ada")
    secret = plain[len(keys.KEY_PREFIX) :]
    # Every text-like column of every table in the database, the ledger and audit included.
    columns = await conn.fetch(
        "select c.table_schema, c.table_name, c.column_name from information_schema.columns c"
        " join information_schema.tables t using (table_schema, table_name)"
        " where t.table_type = 'BASE TABLE'"
        " and c.table_schema not in ('pg_catalog', 'information_schema')"
        " and c.data_type in ('text', 'character varying', 'character', 'jsonb', 'json',"
        " 'ARRAY', 'bytea')"
    )
    assert len(columns) > 20
    found = []
    for r in columns:
        ident = f'"{r["table_schema"]}"."{r["table_name"]}"'
        hits = await conn.fetchval(
            f'select count(*) from {ident} where strpos("{r["column_name"]}"::text, $1) > 0',
            secret[:20],
        )
        if hits:
            found.append(f"{ident}.{r['column_name']}")
    assert found == []
    assert secret[:20] not in caplog.text


@pytest.mark.parametrize(
    "label",
    ["", "   ", None, 7, "x" * 101, "bad\nlabel", "tab\there"],
)
async def test_bad_label_is_one_line_naming_the_field(conn, label):
    ada = await add_user(conn, "ada")
    with pytest.raises(keys.ApiKeyError, match=r"^label: "):
        await keys.create(conn, ada.id, label, actor="ada")
    assert await conn.fetchval("select count(*) from api_keys") == 0


@pytest.mark.parametrize("days", ["0", "-1", "abc", "1.5", 0, 4000, True, [3]])
def test_bad_expiry_is_one_line_naming_the_field(days):
    with pytest.raises(keys.ApiKeyError, match=r"^expires_days: "):
        keys.expiry_in_days(days)


def test_expiry_in_days():
    assert keys.expiry_in_days(None) is None and keys.expiry_in_days(" ") is None
    soon = keys.expiry_in_days("2")
    assert timedelta(days=2) - timedelta(seconds=5) < soon - datetime.now(UTC) <= timedelta(days=2)


async def test_expiry_in_the_past_unknown_or_disabled_user_and_the_cap(conn, monkeypatch):
    ada = await add_user(conn, "ada")
    with pytest.raises(keys.ApiKeyError, match=r"^expires: "):
        await make(conn, ada, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    with pytest.raises(keys.ApiKeyError, match=r"^user: no such user"):
        await keys.create(conn, uuid.uuid4(), "x", actor="boss")
    monkeypatch.setattr(keys, "MAX_ACTIVE", 2)
    first, _ = await make(conn, ada, "one")
    await make(conn, ada, "two")
    with pytest.raises(keys.ApiKeyError, match="2 active keys already"):
        await make(conn, ada, "three")
    await keys.revoke(conn, first.id, actor="ada")
    await make(conn, ada, "three")
    await accounts.set_disabled(conn, "ada", True)
    with pytest.raises(keys.ApiKeyError, match="^user: ada is disabled"):
        await make(conn, ada, "four")


@pytest.mark.parametrize(
    "bad",
    [
        None,
        "",
        42,
        b"vtai-",
        "vtai-short",
        "sk-" + "a" * 48,
        " vtai-" + "a" * 43,
        "vtai-" + "a" * 43 + "\n",
        "vtai-" + "é" * 43,
        "vtai-" + "a" * 44,
    ],
)
async def test_owner_is_none_for_malformed_tokens_without_asking(bad):
    closed = SimpleNamespace(db=SimpleNamespace(pool=None, gate_pool=None), store=None)
    assert await keys.owner(closed, bad) is None


async def test_owner_refuses_revoked_expired_disabled_and_deleted(conn, pool):
    s = direct(pool)
    ada = await add_user(conn, "ada")
    key, plain = await make(conn, ada)
    found = await keys.owner(s, plain)
    assert found == keys.KeyOwner(key.id, ada.id, "laptop")
    # well-formed but unknown, and one character off
    assert await keys.owner(s, keys.new_key()) is None
    assert await keys.owner(s, plain[:-1] + ("A" if plain[-1] != "A" else "B")) is None

    # expired: refused from the next request on
    await conn.execute("update api_keys set expires_at = now() - interval '1 second'")
    assert await keys.owner(s, plain) is None
    await conn.execute("update api_keys set expires_at = now() + interval '1 hour'")
    assert await keys.owner(s, plain) == found

    # the user disabled, then enabled again
    await accounts.set_disabled(conn, "ada", True)
    assert await keys.owner(s, plain) is None
    await accounts.set_disabled(conn, "ada", False)
    assert await keys.owner(s, plain) == found

    # revoked
    await keys.revoke(conn, key.id, actor="ada")
    assert await keys.owner(s, plain) is None

    # the user deleted: the keys go with the profile, and the ledger keeps its rows
    bob = await add_user(conn, "bob")
    bkey, bplain = await make(conn, bob)
    await conn.execute(
        "insert into request_logs (litellm_call_id, end_user, status, total_tokens, source,"
        " api_key_id) values ('api-1', $1, 'success', 5, 'api', $2)",
        bob.id,
        bkey.id,
    )
    assert await keys.owner(s, bplain) is not None
    await conn.execute("delete from profiles where id = $1", bob.id)
    assert await keys.owner(s, bplain) is None
    assert await conn.fetchval("select count(*) from api_keys where user_id = $1", bob.id) == 0
    assert await conn.fetchval("select api_key_id from request_logs") == bkey.id


async def test_last_used_is_written_at_most_once_a_minute(conn, pool):
    s = direct(pool)
    ada = await add_user(conn, "ada")
    key, plain = await make(conn, ada)
    await keys.owner(s, plain)
    first = await conn.fetchval("select last_used_at from api_keys where id = $1", key.id)
    assert first is not None
    await keys.owner(s, plain)
    assert await conn.fetchval("select last_used_at from api_keys") == first
    await conn.execute("update api_keys set last_used_at = now() - interval '61 seconds'")
    await keys.owner(s, plain)
    assert await conn.fetchval("select last_used_at from api_keys") > first
    # a request that finds the row locked (a revoke in flight) skips the write, not waits
    await conn.execute("update api_keys set last_used_at = now() - interval '1 hour'")
    async with pool.acquire() as other, other.transaction():
        await other.execute("select 1 from api_keys where id = $1 for update", key.id)
        assert await keys.owner(s, plain) is not None


async def test_owner_through_the_running_services(services, conn):
    ada = await add_user(conn, "ada")
    key, plain = await make(conn, ada)
    assert await keys.owner(services, plain) == keys.KeyOwner(key.id, ada.id, "laptop")


async def test_owner_raises_only_when_the_database_cant_be_asked(db_url):
    closed = await asyncpg.create_pool(db_url, min_size=1, max_size=1)
    await closed.close()
    with pytest.raises(keys.KeysUnavailable, match="can't be checked right now"):
        await keys.owner(direct(closed), keys.new_key())


async def test_made_up_keys_are_remembered_and_lookups_never_take_the_gates_pool(db_url):
    """A flood of made-up keys: each is asked once, and at most LOOKUPS at a time, so chat
    turns always find a connection in the gate's pool."""
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=5)
    asked = []
    at_once = [0, 0]  # now, most

    class Counting:
        async def fetchrow(self, query, *args):
            asked.append(args)
            at_once[0] += 1
            at_once[1] = max(at_once)
            try:
                return await pool.fetchrow(query, *args)
            finally:
                at_once[0] -= 1

        async def fetchval(self, query, *args):
            return await pool.fetchval(query, *args)

    try:
        made_up = [keys.new_key() for _ in range(20)]
        await asyncio.gather(*(keys.owner(direct(Counting()), k) for k in made_up * 3))
        assert len(asked) == len(made_up)  # each asked once, then remembered as unknown
        assert at_once[1] == keys.LOOKUPS  # never more than LOOKUPS of the gate's connections
        assert keys._lookups._value == keys.LOOKUPS  # every lookup gave its place back
    finally:
        await pool.close()


async def test_rest_only_mode_asks_the_same_function_over_rpc(db_url, conn):
    ada = await add_user(conn, "ada")
    key, plain = await make(conn, ada)
    server = await FakePostgrest(db_url).start()
    service = await SupabaseStore.connect(server.url, token("service_role"))
    anon = await SupabaseStore.connect(server.url, token("anon"))
    try:
        rest = SimpleNamespace(db=None, store=service)
        assert await keys.owner(rest, plain) == keys.KeyOwner(key.id, ada.id, "laptop")
        assert await conn.fetchval("select last_used_at from api_keys") is not None
        assert await keys.owner(rest, keys.new_key()) is None
        await keys.revoke(conn, key.id, actor="ada")
        assert await keys.owner(rest, plain) is None
        # the public anon key may not look keys up at all
        with pytest.raises(keys.KeysUnavailable):
            await keys.owner(SimpleNamespace(db=None, store=anon), plain)
        await server.stop()
        with pytest.raises(keys.KeysUnavailable):
            await keys.owner(rest, plain)
    finally:
        await service.close()
        await anon.close()
        await server.stop()


async def test_usage_this_period_reads_the_keys_rows_through_the_partial_index(conn):
    ada = await add_user(conn, "ada")
    one, _ = await make(conn, ada, "one")
    two, _ = await make(conn, ada, "two")
    await conn.execute(
        "insert into request_logs (litellm_call_id, end_user, status, total_tokens,"
        " counted_tokens, period_start, source, api_key_id) values"
        " ('a', $1, 'success', 10, 20, vtai_period_start('month', now()), 'api', $2),"
        " ('b', $1, 'success', 5, null, vtai_period_start('month', now()), 'api', $2),"
        " ('c', $1, 'success', 7, 7, vtai_period_start('month', now()) - interval '1 month',"
        "  'api', $2),"
        " ('d', $1, 'success', 100, 100, vtai_period_start('month', now()), 'chat', null)",
        ada.id,
        one.id,
    )
    assert await keys.usage(conn, [one.id, two.id], "month") == {one.id: 25, two.id: 0}
    assert await keys.usage(conn, [], "month") == {}
    await conn.execute("set enable_seqscan = off")
    plan = "\n".join(
        r[0]
        for r in await conn.fetch(
            "explain select sum(counted_tokens) from request_logs where api_key_id = any($1)"
            " and period_start = now()",
            [one.id],
        )
    )
    assert "request_logs_api_key_period_idx" in plan, plan


async def test_embedded_mode_app_role_creates_and_looks_keys_up(db_url, conn):
    """The embedded database's app connections use a role that is no superuser and owns
    nothing (vtai.db.embedded.prepare_app_role): it may make, revoke and look keys up."""
    from urllib.parse import urlsplit, urlunsplit

    from vtai.db import embedded

    role, password = f"vtai_app_{uuid.uuid4().hex[:8]}", "app-role-test-password"
    await embedded.prepare_app_role(conn, password, role=role)
    parts = urlsplit(db_url)
    app_url = urlunsplit(parts._replace(netloc=f"{role}:{password}@{parts.hostname}:{parts.port}"))
    app = await asyncpg.create_pool(app_url, min_size=1, max_size=2)
    try:
        async with app.acquire() as c:
            me = "select rolsuper from pg_roles where rolname = current_user"
            assert not await c.fetchval(me)
            ada = await add_user(c, "ada")
            key, plain = await make(c, ada)
            assert await keys.owner(direct(app), plain) == keys.KeyOwner(key.id, ada.id, "laptop")
            await keys.revoke(c, key.id, actor="ada")
            assert await keys.owner(direct(app), plain) is None
    finally:
        await app.close()
        await conn.execute(f"drop owned by {role}")
        await conn.execute(f"drop role {role}")
