"""POST /billing/webhook over real HTTP: events signed as Stripe signs them, verified by the real
`stripe` library, applied by the SQL on real Postgres. Subscriptions, customers, payments and
refunds come from localstripe; Checkout sessions are stand-ins (localstripe has none), and the
tests that use one say so in their names."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from fastapi import FastAPI

from tests.billing import conftest as bc
from tests.billing.conftest import basil_subscription, event, invoice, sign
from tests.conftest import add_user, make_settings
from vtai.billing import grace, webhook
from vtai.services import Services


async def sql(app, query, *args):
    conn = await asyncpg.connect(app.services.settings.database_url)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


async def new_user(app, tier="free"):
    conn = await asyncpg.connect(app.services.settings.database_url)
    try:
        return await add_user(conn, tier=tier)
    finally:
        await conn.close()


async def tier_of(app, user) -> str:
    return (await sql(app, "select tier from profiles where id = $1", user.id))[0]["tier"]


async def stored(app) -> int:
    return (await sql(app, "select count(*) as n from billing_events"))[0]["n"]


@pytest.fixture
async def premium(stripe_api, prices):
    """A premium Price in localstripe, mapped in VTAI_STRIPE_PRICES."""
    price = await stripe_api.price("premium")
    prices[price] = "premium"
    return price


@pytest.fixture
async def subscribed(webhook_app, stripe_api, premium):
    """(app, user, localstripe subscription): a user whose premium subscription was created in
    localstripe and announced to the webhook."""
    user = await new_user(webhook_app)
    customer = await stripe_api.customer(user.id)
    sub = await stripe_api.subscription(customer["id"], premium, user.id)
    assert sub["status"] == "active"
    created = event("customer.subscription.created", basil_subscription(sub))
    result = await webhook_app.ok(created)
    assert result["applied"] and "tier free -> premium" in result["outcome"]
    return webhook_app, user, sub


# --- Signatures -----------------------------------------------------------------------------


async def test_webhook_rejects_no_signature_and_stores_nothing(webhook_app):
    response = await webhook_app.send(event("customer.created", {"id": "cus_x"}), header=None)
    assert response.status_code == 400
    assert "Stripe-Signature" in response.json()["error"]
    assert await stored(webhook_app) == 0


async def test_webhook_rejects_wrong_secret_and_stores_nothing(webhook_app):
    response = await webhook_app.send(event("customer.created", {}), secret="whsec_not_ours")
    assert response.status_code == 400
    assert "does not match" in response.json()["error"]
    garbled = await webhook_app.send(event("customer.created", {}), header="t=1,v1=00")
    assert garbled.status_code == 400
    assert await stored(webhook_app) == 0


async def test_webhook_rejects_a_stale_timestamp_and_stores_nothing(webhook_app):
    stale = int(time.time()) - 301
    response = await webhook_app.send(event("customer.created", {}), timestamp=stale)
    assert response.status_code == 400
    assert "tolerance" in response.json()["error"]
    assert await stored(webhook_app) == 0


async def test_webhook_rejects_a_body_changed_after_signing(webhook_app):
    original = event("customer.created", {})
    header = sign(bc.json.dumps(original).encode())
    original["type"] = "customer.subscription.deleted"
    assert (await webhook_app.send(original, header=header)).status_code == 400
    assert await stored(webhook_app) == 0


async def test_webhook_is_404_with_billing_off(db_url, tmp_path, monkeypatch):
    services = await Services.start(make_settings(db_url, tmp_path), replay=False)
    monkeypatch.setattr(webhook, "_services", lambda: services)
    app = FastAPI()
    webhook.register(app)
    server, task, sock, base = await bc.serve(app)
    try:
        async with bc.httpx.AsyncClient() as http:
            body = bc.json.dumps(event("customer.created", {})).encode()
            response = await http.post(
                base + webhook.PATH, content=body, headers={"stripe-signature": sign(body)}
            )
        assert response.status_code == 404
        assert "STRIPE_SECRET_KEY" in response.json()["error"]
    finally:
        server.should_exit = True
        await task
        sock.close()
        await services.stop()


async def test_webhook_never_logs_the_secret_or_the_signature(webhook_app, caplog):
    caplog.set_level(logging.DEBUG)
    evt = event("customer.created", {"id": "cus_log"})
    header = sign(bc.json.dumps(evt).encode())
    await webhook_app.send(evt, header=header)
    await webhook_app.send(evt, secret="whsec_wrong_secret_value")
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert bc.WEBHOOK_SECRET not in text and "whsec_wrong_secret_value" not in text
    assert header.split("v1=")[1] not in text and bc.SECRET_KEY not in text


# --- Subscriptions --------------------------------------------------------------------------


async def test_webhook_duplicate_event_changes_nothing(subscribed, stripe_api):
    app, user, sub = subscribed
    deleted = event("customer.subscription.deleted", basil_subscription(sub, status="canceled"))
    first = await app.ok(deleted)
    assert first["applied"] and "tier premium -> free" in first["outcome"]
    await sql(app, "update profiles set tier = 'basic' where id = $1", user.id)
    again = await app.ok(deleted)
    assert again == {"received": True, "applied": False, "outcome": "duplicate"}
    assert await tier_of(app, user) == "basic"
    assert await stored(app) == 2


async def test_webhook_older_update_after_a_newer_one_changes_nothing(subscribed, prices):
    app, user, sub = subscribed
    now = int(time.time())
    start, end = sub["current_period_start"], sub["current_period_end"]
    # A renewal: the next period, downgraded to basic.
    prices["price_basic_x"] = "basic"
    renewed = basil_subscription(sub, period=(end, end + 30 * 86400))
    renewed["items"]["data"][0]["price"]["id"] = "price_basic_x"
    assert (
        "premium -> basic"
        in (await app.ok(event("customer.subscription.updated", renewed, now)))["outcome"]
    )
    # The previous period's update, made earlier by Stripe but delivered late.
    late = basil_subscription(sub, period=(start, end))
    older = await app.ok(event("customer.subscription.updated", late, now - 5))
    assert older["outcome"] == "ignored: older than the state applied"
    # Same period, an older event time: older too.
    past_due = basil_subscription(sub, status="past_due", period=(end, end + 30 * 86400))
    assert (await app.ok(event("customer.subscription.updated", past_due, now - 60)))[
        "outcome"
    ] == "ignored: older than the state applied"
    assert await tier_of(app, user) == "basic"
    row = (await sql(app, "select status, tier from billing_subscriptions"))[0]
    assert (row["status"], row["tier"]) == ("active", "basic")


async def test_webhook_update_after_deleted_never_brings_it_back(subscribed):
    app, user, sub = subscribed
    now = int(time.time())
    gone = basil_subscription(sub, status="canceled")
    await app.ok(event("customer.subscription.deleted", gone, now))
    assert await tier_of(app, user) == "free"
    # An .updated sent later (or with a later period) than the deletion still changes nothing.
    later = basil_subscription(
        sub, period=(sub["current_period_end"], sub["current_period_end"] + 86400)
    )
    result = await app.ok(event("customer.subscription.updated", later, now + 10))
    assert result["outcome"] == "ignored: the subscription is canceled"
    assert await tier_of(app, user) == "free"


async def test_webhook_cancel_at_period_end_keeps_the_tier_until_deleted(subscribed, stripe_api):
    app, user, sub = subscribed
    now = int(time.time())
    cancelling = basil_subscription(sub, cancel_at_period_end=True)
    result = await app.ok(event("customer.subscription.updated", cancelling, now + 1))
    assert "cancels at period end" in result["outcome"]
    assert await tier_of(app, user) == "premium"
    # Even past the period's end, until Stripe deletes it (the sweep doesn't end it early).
    await grace.sweep(
        app.services, app.services.settings, now=datetime.now(UTC) + timedelta(days=40)
    )
    assert await tier_of(app, user) == "premium"
    # Stripe deletes it at the period's end; localstripe does the same on an immediate cancel.
    deleted = await stripe_api.client.delete(f"/v1/subscriptions/{sub['id']}")
    assert deleted.json()["status"] == "canceled"
    gone = basil_subscription(deleted.json(), cancel_at_period_end=True)
    assert (
        "premium -> free"
        in (await app.ok(event("customer.subscription.deleted", gone, now + 2)))["outcome"]
    )
    assert await tier_of(app, user) == "free"


# --- Payment failure and grace --------------------------------------------------------------


async def test_webhook_payment_failure_keeps_the_tier_through_grace_then_free(subscribed):
    app, user, sub = subscribed
    now = int(time.time())
    failed = invoice(sub["id"], sub["customer"], "open")
    result = await app.ok(event("invoice.payment_failed", failed, now + 1))
    assert (
        "payment failing since" in result["outcome"] and "tier stays premium" in result["outcome"]
    )
    past_due = basil_subscription(sub, status="past_due")
    await app.ok(event("customer.subscription.updated", past_due, now + 2))
    assert await tier_of(app, user) == "premium"
    settings = app.services.settings
    soon = datetime.now(UTC) + timedelta(days=settings.billing_grace_days - 1)
    assert await grace.sweep(app.services, settings, now=soon) == []
    assert await tier_of(app, user) == "premium"
    later = datetime.now(UTC) + timedelta(days=settings.billing_grace_days, minutes=1)
    assert await grace.sweep(app.services, settings, now=later) == [(user.id, "premium", "free")]
    assert await tier_of(app, user) == "free"
    audit = await sql(app, "select actor, after from audit_log order by id")
    assert [a["actor"] for a in audit][-1] == "stripe:grace-period-ended"


async def test_webhook_invoice_paid_within_grace_keeps_the_tier(subscribed):
    app, user, sub = subscribed
    now = int(time.time())
    await app.ok(event("invoice.payment_failed", invoice(sub["id"], sub["customer"], "open"), now))
    await app.ok(
        event("customer.subscription.updated", basil_subscription(sub, status="past_due"), now)
    )
    paid = await app.ok(
        event("invoice.paid", invoice(sub["id"], sub["customer"], "paid"), now + 60)
    )
    assert "payment recovered" in paid["outcome"]
    await app.ok(event("customer.subscription.updated", basil_subscription(sub), now + 61))
    later = datetime.now(UTC) + timedelta(days=30)
    assert await grace.sweep(app.services, app.services.settings, now=later) == []
    assert await tier_of(app, user) == "premium"
    # The failure, delivered again late under another event id, doesn't restart the grace.
    stale = await app.ok(
        event("invoice.payment_failed", invoice(sub["id"], sub["customer"], "open"), now - 5)
    )
    assert stale["outcome"].endswith("ignored: older than the state applied; tier stays premium")


# --- Top-ups and refunds --------------------------------------------------------------------


async def test_webhook_stand_in_checkout_topup_grant_and_localstripe_refund(
    webhook_app, stripe_api, prices
):
    prices["price_pack_x"] = {"topup_tokens": 50_000}
    user = await new_user(webhook_app)
    customer = await stripe_api.customer(user.id)
    intent = await stripe_api.paid_payment_intent(1000)
    assert intent["status"] == "succeeded"
    session = bc.stand_in_checkout_session(
        user_id=user.id,
        customer=customer["id"],
        mode="payment",
        payment_intent=intent["id"],
        price="price_pack_x",
    )
    done = await webhook_app.ok(event("checkout.session.completed", session))
    assert "grant 50000 tokens until" in done["outcome"]
    grant = (await sql(webhook_app, "select * from token_grants"))[0]
    assert (grant["end_user"], grant["tokens"], grant["ref"]) == (user.id, 50_000, intent["id"])
    link = await sql(webhook_app, "select user_id, customer_id from billing_customers")
    assert [tuple(r) for r in link] == [(user.id, customer["id"])]
    assert await tier_of(webhook_app, user) == "free"

    await sql(webhook_app, "update token_grants set used = 20000")
    charge = await stripe_api.refund(intent["id"], 250)  # a quarter of the payment
    assert (charge["amount"], charge["amount_refunded"]) == (1000, 250)
    await webhook_app.ok(event("charge.refunded", charge))
    assert (await sql(webhook_app, "select tokens from token_grants"))[0]["tokens"] == 37_500
    charge = await stripe_api.refund(intent["id"], 750)  # the rest
    result = await webhook_app.ok(event("charge.refunded", charge))
    assert "-> 20000 tokens (20000 used)" in result["outcome"]
    row = (await sql(webhook_app, "select tokens, used from token_grants"))[0]
    assert tuple(row) == (20_000, 20_000)


async def test_webhook_stand_in_checkout_links_the_customer_for_later_subscription_events(
    webhook_app, stripe_api, premium
):
    """A subscription whose events carry no user id is found by the customer Checkout linked."""
    user = await new_user(webhook_app)
    customer = await stripe_api.customer(user.id)
    session = bc.stand_in_checkout_session(
        user_id=user.id, customer=customer["id"], mode="subscription"
    )
    await webhook_app.ok(event("checkout.session.completed", session))
    sub = await stripe_api.subscription(customer["id"], premium, user.id)
    anonymous = basil_subscription(sub, metadata={})
    result = await webhook_app.ok(event("customer.subscription.created", anonymous))
    assert result["applied"] and "free -> premium" in result["outcome"]
    assert await tier_of(webhook_app, user) == "premium"
