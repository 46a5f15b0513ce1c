"""The billing functions (functions/50_billing.sql) called directly, on real Postgres: what the
webhook's HTTP tests can't reach cheaply (locks, privileges, refunds adding up)."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg

from tests.conftest import add_user

NOW = datetime.now(UTC).replace(microsecond=0)


def _evt() -> str:
    return f"evt_{uuid.uuid4().hex}"


async def subscribe(
    conn,
    user,
    tier="premium",
    status="active",
    *,
    event=None,
    created=NOW,
    end=None,
    sub="sub_1",
    cancel=False,
):
    return await conn.fetchrow(
        "select * from vtai_billing_subscription($1, 'customer.subscription.updated', $2, $3,"
        " 'cus_1', $4, $5, 'price_x', $6, $7, $8, $9, 7, '{}'::jsonb)",
        event or _evt(),
        created,
        user.id if user else None,
        sub,
        status,
        tier,
        created - timedelta(days=1),
        end or NOW + timedelta(days=29),
        cancel,
    )


async def tier_of(conn, user) -> str:
    return await conn.fetchval("select tier from profiles where id = $1", user.id)


async def test_billing_sql_duplicate_event_changes_nothing(conn):
    user = await add_user(conn)
    event = _evt()
    first = await subscribe(conn, user, event=event)
    assert first["applied"] and (first["old_tier"], first["new_tier"]) == ("free", "premium")
    # The same event id again, even saying something else: stored once, applied once.
    again = await subscribe(conn, user, tier="basic", event=event)
    assert not again["applied"] and again["outcome"] == "duplicate"
    assert await tier_of(conn, user) == "premium"
    assert await conn.fetchval("select count(*) from billing_events") == 1
    audit = await conn.fetch("select actor, action, target, before, after from audit_log")
    assert [(a["actor"], a["action"], a["target"]) for a in audit] == [
        (f"stripe:{event}", "user.tier", user.username)
    ]
    stored = await conn.fetchrow("select user_id, outcome from billing_events")
    assert stored["user_id"] == user.id and "tier free -> premium" in stored["outcome"]


async def test_billing_sql_best_tier_wins_and_users_without_subscriptions_are_untouched(conn):
    subscriber = await add_user(conn)
    admin_set = await add_user(conn, tier="unlimited")
    await subscribe(conn, subscriber, "basic", sub="sub_a")
    await subscribe(conn, subscriber, "premium", sub="sub_b")
    assert await tier_of(conn, subscriber) == "premium"
    await subscribe(conn, subscriber, "premium", "canceled", sub="sub_b")
    assert await tier_of(conn, subscriber) == "basic"
    # A sweep far in the future touches neither the admin's user nor a paying subscriber.
    assert (
        await conn.fetch("select * from vtai_billing_sweep($1, 7)", NOW + timedelta(days=90)) == []
    )
    assert await tier_of(conn, admin_set) == "unlimited"
    assert await tier_of(conn, subscriber) == "basic"


async def test_billing_sql_unknown_tier_and_unknown_customer_are_stored_as_ignored(conn):
    user = await add_user(conn)
    orphan = await subscribe(conn, None, sub="sub_orphan")
    assert orphan["applied"] and orphan["outcome"].startswith("ignored: no VT.ai user")
    odd = await subscribe(conn, user, tier="no_such_tier", sub="sub_odd")
    assert "unknown tier no_such_tier" in odd["outcome"]
    assert await tier_of(conn, user) == "free"
    other = await conn.fetchrow(
        "select * from vtai_billing_record($1, 'customer.created', now(), '{}'::jsonb)", _evt()
    )
    assert other["applied"] and other["outcome"] == "ignored"


async def _grant(conn, user, tokens=1000, ref="pi_1"):
    return await conn.fetchrow(
        "select * from vtai_billing_checkout($1, 'checkout.session.completed', $2, $3, 'cus_1',"
        " '{}'::jsonb, $4, $5)",
        _evt(),
        NOW,
        user.id,
        tokens,
        ref,
    )


async def _refund(conn, refunded, amount=1000, ref="pi_1", event=None):
    payload = {
        "data": {"object": {"payment_intent": ref, "amount": amount, "amount_refunded": refunded}}
    }
    return await conn.fetchrow(
        "select * from vtai_billing_refund($1, 'charge.refunded', now(), $2, $3, $4,"
        " $5::text::jsonb, 'month')",
        event or _evt(),
        ref,
        amount,
        refunded,
        json.dumps(payload),
    )


async def test_billing_sql_grant_lasts_to_the_periods_end_and_at_least_30_days(conn):
    user = await add_user(conn)
    assert (await _grant(conn, user))["applied"]
    grant = await conn.fetchrow("select * from token_grants where end_user = $1", user.id)
    start = NOW.replace(day=1, hour=0, minute=0, second=0)
    month_end = (start + timedelta(days=32)).replace(day=1)
    assert grant["expires_at"] == max(month_end, NOW + timedelta(days=30))
    assert (grant["tokens"], grant["used"], grant["source"], grant["ref"]) == (
        1000,
        0,
        "stripe",
        "pi_1",
    )
    # Another checkout naming the same PaymentIntent grants nothing more.
    assert "already made" in (await _grant(conn, user))["outcome"]
    assert await conn.fetchval("select count(*) from token_grants") == 1


async def test_billing_sql_partial_refunds_add_up_and_never_go_below_used(conn):
    user = await add_user(conn)
    await _grant(conn, user, tokens=1000)
    await conn.execute("update token_grants set used = 100")
    first = await _refund(conn, 300)  # 30 % of the payment
    assert await conn.fetchval("select tokens from token_grants") == 700
    # An older, smaller running total arriving late changes nothing.
    assert (await _refund(conn, 200))["outcome"] == "ignored: older than the state applied"
    await _refund(conn, 500)  # 20 % more: 500 of the 1000 tokens stay
    assert await conn.fetchval("select tokens from token_grants") == 500
    await conn.execute("update token_grants set used = 450")
    await _refund(conn, 900)  # 90 % in all would leave 100: never below the 450 used
    assert await conn.fetchval("select tokens from token_grants") == 450
    await _refund(conn, 1000)
    assert await conn.fetchrow("select tokens, used from token_grants") == (450, 450)
    assert first["user_id"] == user.id


async def test_billing_sql_refund_waits_for_the_gates_counter_lock(db_url, conn):
    """vtai_reserve counts grants holding the user's counter row: a refund takes that row first,
    so it can't change a grant under a reserve in flight."""
    user = await add_user(conn)
    await _grant(conn, user, tokens=1000)
    gate = await asyncpg.connect(db_url)
    refunder = await asyncpg.connect(db_url)
    try:
        async with gate.transaction():
            await gate.fetchrow("select * from vtai_reserve($1, 10, 10)", user.id)
            pid = refunder.get_server_pid()
            refund = asyncio.create_task(_refund(refunder, 1000))
            # The wait happens in the server: nothing to await but its pg_stat_activity row.
            async with asyncio.timeout(10):
                while not await conn.fetchval(  # noqa: ASYNC110
                    "select wait_event_type = 'Lock' from pg_stat_activity where pid = $1", pid
                ):
                    await asyncio.sleep(0.02)
            assert await conn.fetchval("select tokens from token_grants") == 1000
        assert (await refund)["outcome"].startswith("refund 1000 of 1000")
        assert await conn.fetchval("select tokens from token_grants") == 0
    finally:
        await gate.close()
        await refunder.close()


async def test_billing_sql_functions_are_for_the_server_only(conn):
    names = await conn.fetch(
        "select p.oid::regprocedure::text as name from pg_proc p"
        " join pg_namespace n on n.oid = p.pronamespace"
        " where n.nspname = 'public' and p.proname like 'vtai\\_billing\\_%'"
    )
    assert len(names) == 12
    for row in names:
        for role in ("anon", "authenticated", "public"):
            if role == "public":
                query = (
                    "select exists (select 1 from pg_proc p, aclexplode(p.proacl) a"
                    " where p.oid = $1::regprocedure and a.grantee = 0)"
                )
                assert not await conn.fetchval(query, row["name"]), row["name"]
            else:
                assert not await conn.fetchval(
                    "select has_function_privilege($1, $2, 'execute')", role, row["name"]
                ), (role, row["name"])
        assert await conn.fetchval(
            "select has_function_privilege('service_role', $1, 'execute')", row["name"]
        )


async def test_billing_sql_a_later_event_applies_even_with_an_earlier_period_end(conn):
    """Yearly to monthly moves current_period_end earlier: the change and the deletion after
    it still apply (Stripe's `created` orders them, not the period end)."""
    user = await add_user(conn)
    await subscribe(conn, user, "premium", created=NOW, end=NOW + timedelta(days=365))
    moved = await subscribe(
        conn, user, "basic", created=NOW + timedelta(seconds=5), end=NOW + timedelta(days=30)
    )
    assert "tier premium -> basic" in moved["outcome"]
    gone = await subscribe(
        conn, user, "basic", "canceled", created=NOW, end=NOW + timedelta(days=30)
    )
    assert "tier basic -> free" in gone["outcome"]  # a deletion applies whenever it comes
    again = await subscribe(conn, user, "premium", created=NOW + timedelta(seconds=9))
    assert again["outcome"] == "ignored: the subscription is canceled"
    assert await tier_of(conn, user) == "free"


async def test_billing_sql_same_second_events_never_step_back_to_incomplete(conn):
    user = await add_user(conn)
    await subscribe(conn, user, "premium", "active", created=NOW)
    late = await subscribe(conn, user, "premium", "incomplete", created=NOW)
    assert late["outcome"] == "ignored: older than the state applied"
    assert await tier_of(conn, user) == "premium"


async def test_billing_sql_active_again_ends_a_grace_period_whatever_came_before(conn):
    """A declined first card, then a second that pays: incomplete -> active clears the
    failure, so the sweep never drops a paying user."""
    user = await add_user(conn)
    await subscribe(conn, user, "premium", "incomplete", created=NOW)
    await conn.execute("update billing_subscriptions set payment_failed_at = $1", NOW)
    await subscribe(conn, user, "premium", "active", created=NOW + timedelta(seconds=1))
    assert await conn.fetchval("select payment_failed_at from billing_subscriptions") is None
    assert (
        await conn.fetch("select * from vtai_billing_sweep($1, 7)", NOW + timedelta(days=30)) == []
    )
    assert await tier_of(conn, user) == "premium"


async def test_billing_sql_another_products_subscription_never_moves_a_tier(conn):
    user = await add_user(conn, tier="unlimited")
    other = await subscribe(conn, user, None, sub="sub_other")
    assert other["outcome"].startswith("ignored: price_x is not a tier's Price")
    assert await conn.fetchval("select count(*) from billing_subscriptions") == 0
    assert await tier_of(conn, user) == "unlimited"


async def test_billing_sql_a_grandfathered_price_keeps_its_tier(conn):
    user = await add_user(conn)
    await subscribe(conn, user, "premium", created=NOW)
    # The operator dropped price_x from VTAI_STRIPE_PRICES: its subscribers stay on premium.
    kept = await subscribe(conn, user, None, created=NOW + timedelta(seconds=1))
    assert "tier stays premium" in kept["outcome"]


async def test_billing_sql_a_refund_before_its_checkout_is_taken_off_the_grant(conn):
    user = await add_user(conn)
    early = await _refund(conn, 400, ref="pi_early")
    assert early["outcome"] == "ignored: no grant paid by pi_early"
    made = await _grant(conn, user, tokens=1000, ref="pi_early")
    assert "grant 600 tokens" in made["outcome"]
    # The next refund of the same charge (Stripe's running total) takes only its own part.
    later = await _refund(conn, 700, ref="pi_early")
    assert later["outcome"].startswith("refund 700 of 1000")
    assert await conn.fetchval("select tokens from token_grants where ref = 'pi_early'") == 300


async def test_billing_sql_a_dispute_takes_what_is_left_of_the_grant(conn):
    user = await add_user(conn)
    await _grant(conn, user, tokens=1000, ref="pi_d")
    await conn.execute("update token_grants set used = 250 where ref = 'pi_d'")
    payload = {"data": {"object": {"payment_intent": "pi_d", "amount": 500}}}
    await conn.fetchrow(
        "select * from vtai_billing_refund($1, 'charge.dispute.created', now(), 'pi_d', 500, 500,"
        " $2::text::jsonb, 'month')",
        _evt(),
        json.dumps(payload),
    )
    assert await conn.fetchval("select tokens from token_grants where ref = 'pi_d'") == 250


async def test_billing_sql_a_deleted_customer_is_unlinked(conn):
    user = await add_user(conn)
    await subscribe(conn, user, "premium")
    gone = await conn.fetchrow(
        "select * from vtai_billing_customer_deleted($1, 'customer.deleted', now(), 'cus_1',"
        " '{}'::jsonb)",
        _evt(),
    )
    assert gone["outcome"] == "customer cus_1 unlinked" and gone["user_id"] == user.id
    assert await conn.fetchval("select count(*) from billing_customers") == 0
