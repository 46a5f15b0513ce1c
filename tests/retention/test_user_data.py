"""`vtai user export` and `vtai user delete`: a user's data out, then the user gone, with what
they were billed kept (anonymised) so counters, aggregates and totals still equal the ledger.

Stripe is a real local Stripe server (localstripe). Supabase Auth's admin API can't run here:
`StandInAuthAdmin` is a STAND-IN for its one call, `DELETE /auth/v1/admin/users/{id}`.
"""

from __future__ import annotations

import json
import uuid
import zipfile

import asyncpg
import pytest
from aiohttp import web

from tests.background_server import BackgroundServer
from tests.billing.conftest import SECRET_KEY, localstripe, stripe_api  # noqa: F401
from tests.conftest import add_user, make_settings
from tests.retention import seed
from vtai.api import keys
from vtai.db.connection import Database
from vtai.plans import audit
from vtai.retention import delete, export

SERVICE_KEY = "stand-in-service-key"


class StandInAuthAdmin(BackgroundServer):
    """A STAND-IN for Supabase Auth's admin endpoint: records each user deleted."""

    def __init__(self):
        super().__init__()
        self.deleted: list[tuple[str, str]] = []

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_delete("/auth/v1/admin/users/{id}", self.delete)
        return app

    async def delete(self, request: web.Request) -> web.Response:
        self.deleted.append((request.match_info["id"], request.headers.get("Authorization", "")))
        return web.json_response({})


async def _count(conn, where: str, *args) -> int:
    return await conn.fetchval(f"select count(*) from {where}", *args)


async def _billing(conn, stripe_api, user):  # noqa: F811
    customer = await stripe_api.customer(user.id)
    sub = await stripe_api.subscription(customer["id"], await stripe_api.price("basic"), user.id)
    await conn.execute(
        "insert into billing_customers (user_id, customer_id) values ($1, $2)",
        user.id,
        customer["id"],
    )
    await conn.execute(
        "insert into billing_subscriptions (subscription_id, user_id, customer_id, status,"
        " event_created) values ($1, $2, $3, 'active', now())",
        sub["id"],
        user.id,
        customer["id"],
    )
    payload = {
        "id": f"evt_{uuid.uuid4().hex[:10]}",
        "type": "invoice.paid",
        "data": {
            "object": {
                "id": "in_1",
                "customer": customer["id"],
                "customer_email": f"{user.username}@example.com",
                "amount_paid": 1000,
                "currency": "usd",
            }
        },
    }
    await conn.execute(
        "insert into billing_events (event_id, type, created, user_id, outcome, payload)"
        " values ($1, 'invoice.paid', now(), $2, 'paid', $3::text::jsonb)",
        payload["id"],
        user.id,
        json.dumps(payload),
    )
    return sub["id"]


@pytest.mark.slow  # starts localstripe
async def test_export_then_delete_stand_in_auth(conn, db_url, tmp_path, stripe_api):  # noqa: F811
    gone, kept = await add_user(conn, "adelaide7"), await add_user(conn, "bertrand9")
    for user, word in ((gone, "gone"), (kept, "kept")):
        await seed.turns(conn, user.id, 3, 6, word)
        await seed.chat(conn, user.id, user.username, 1, word)
        async with conn.transaction():
            await audit.record(
                conn, "cli:test", audit.USER_TIER, user.username, {"tier": "free"}, {"tier": "x"}
            )
        await keys.create(conn, user.id, "laptop", actor=user.username)
    async with conn.transaction():
        await audit.record(conn, gone.username, audit.TIER_SET, "free", None, {"by": gone.username})
    sub_id = await _billing(conn, stripe_api, gone)
    await _billing(conn, stripe_api, kept)

    auth = StandInAuthAdmin().start()
    settings = make_settings(
        db_url,
        tmp_path,
        stripe_secret_key=SECRET_KEY,
        stripe_webhook_secret="whsec_test",
        stripe_api_base=str(stripe_api.client.base_url).rstrip("/"),
        supabase_url=f"http://127.0.0.1:{auth.port}",
        supabase_anon_key="stand-in-anon-key",
        supabase_service_key=SERVICE_KEY,
    )
    db = await Database(settings, pool_size=2).open(migrate=False)
    try:
        # Export: every file, the user's rows, nobody else's, no secrets.
        out = tmp_path / "adelaide7-export.zip"
        async with db.pool.acquire() as c:
            counts = await export.export(c, gone.username, out)
        assert counts["request_logs.json"] == 6 and counts["steps.json"] == 2
        assert counts["api_keys.json"] == 1 and counts["billing_events.json"] == 1
        assert counts["audit_log.json"] == 3 and counts["threads.json"] == 1
        with zipfile.ZipFile(out) as zf:
            texts = {name: zf.read(name).decode() for name in zf.namelist()}
        assert json.loads(texts["profile.json"])["username"] == gone.username
        every = "".join(texts.values())
        assert str(kept.id) not in every and kept.username not in every and "kept" not in every
        assert "key_hash" not in every and "password" not in every
        assert "secret gone answer" in texts["request_logs.json"]
        assert len(json.loads(texts["request_logs.json"])) == 6

        before = await seed.totals(conn)
        gone_rows = await conn.fetchval(
            "select count(*) from request_logs where end_user = $1", gone.id
        )
        done = await delete.delete_user(db, settings, gone.username, "cli:test", lambda _: None)
    finally:
        await db.close()
        auth.stop()

    assert done.ledger_rows == gone_rows == 6 and done.threads == 1
    assert done.cancelled == [sub_id] and done.notes == []
    assert auth.deleted == [(str(gone.id), f"Bearer {SERVICE_KEY}")]
    assert (await stripe_api.get(f"/v1/subscriptions/{sub_id}"))["status"] == "canceled"

    # Totals, counters and aggregates exactly as before; the rows now under the tombstone.
    assert await seed.totals(conn) == before
    await seed.consistent(conn)
    dead = await conn.fetchval("select vtai_deleted_user_id()")
    rows = await conn.fetch("select * from request_logs where end_user = $1", dead)
    assert len(rows) == 6
    assert all(r["messages"] is None and r["response"] is None for r in rows)
    assert all(r["session_id"] is None for r in rows)

    # Nothing names the user anywhere; the other user is untouched.
    assert await conn.fetchval("select count(*) from profiles where id = $1", gone.id) == 0
    for table, column in (
        ("request_logs", "end_user"),
        ("usage_counters", "end_user"),
        ("usage_aggregates", "end_user"),
        ("api_keys", "user_id"),
        ("billing_customers", "user_id"),
        ("billing_subscriptions", "user_id"),
        ("billing_events", "user_id"),
    ):
        assert (
            await conn.fetchval(f"select count(*) from {table} where {column} = $1", gone.id) == 0
        )
    assert (
        await conn.fetchval('select count(*) from "Thread" where "userId" = $1', str(gone.id)) == 0
    )
    assert await conn.fetchval('select count(*) from "Step"') == 2  # the other user's chat
    dump = await conn.fetchval(
        "select string_agg(concat_ws(' ', actor, target, before, after), ' ') from audit_log"
    )
    dump += await conn.fetchval("select string_agg(payload::text, ' ') from billing_events")
    assert gone.username not in dump and str(gone.id) not in dump
    assert "adelaide7@example.com" not in dump and kept.username in dump
    deletion = await conn.fetchrow("select * from audit_log where action = 'user.delete'")
    assert deletion["actor"] == "cli:test" and deletion["target"] == "deleted-user"
    assert (
        await conn.fetchval("select count(*) from request_logs where end_user = $1", kept.id) == 6
    )

    # The audit trail is still append-only outside the deletion's own function.
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await conn.execute("update audit_log set actor = 'someone'")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with conn.transaction():
            await conn.execute("set local vtai.audit_anonymise = 'on'")
            await conn.execute("update audit_log set action = 'x'")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await conn.execute("delete from audit_log")


async def test_logout_disable_are_audited(conn):
    user = await add_user(conn)
    await conn.fetchval("select vtai_session_start($1, 60)", user.id)
    sid = await conn.fetchval("select vtai_session_start($1, 60)", user.id)
    from vtai.db import accounts

    assert await conn.fetchval("select vtai_session_end_audited($1)", sid) is True
    assert await accounts.end_sessions(conn, user.username, actor="cli:ops") == 1
    assert await accounts.set_disabled(conn, user.username, True, actor="cli:ops") == 0
    rows = await conn.fetch("select actor, action, target from audit_log order by id")
    assert [tuple(r) for r in rows] == [
        (user.username, "user.logout", user.username),
        ("cli:ops", "user.logout", user.username),
        ("cli:ops", "user.disable", user.username),
    ]
