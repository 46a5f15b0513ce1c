"""vtai.billing.checkout and offers against a real Postgres and a real localstripe, behind the
STAND-IN for Stripe's hosted Checkout and portal (tests/stand_in_stripe.py; tests using it say
`stand_in`): who a session names, the customer reused, a subscriber's plan changed in place
(never a second subscription), the portal, /billing/* over HTTP, and billing off hiding it all.
"""

from __future__ import annotations

import logging

import asyncpg
import httpx
import pytest
import stripe
from chainlit.auth import create_jwt
from chainlit.user import User
from fastapi import FastAPI

from tests.api.test_account import serve
from tests.conftest import add_user, make_settings
from tests.stand_in_stripe import SECRET_KEY, WEBHOOK_SECRET, StandInStripe, localstripe
from vtai.billing import checkout, offers
from vtai.billing.client import make_client

APP = "http://app.test"
AUTH_SECRET = "test-secret-" + "z" * 40
PRICES = {
    "price_basic": "basic",
    "price_premium": "premium",
    "price_topup": {"topup_tokens": 50_000},
}


@pytest.fixture(scope="module")
def stand_in():
    with localstripe() as upstream:
        server = StandInStripe(upstream).start()
        try:
            with httpx.Client(
                base_url=server.base, headers={"Authorization": f"Bearer {SECRET_KEY}"}
            ) as http:
                for pid, amount, recurring in (
                    ("price_basic", 500, True),
                    ("price_premium", 2000, True),
                    ("price_topup", 500, False),
                ):
                    data = {"id": pid, "currency": "usd", "unit_amount": amount}
                    if recurring:
                        data["recurring[interval]"] = "month"
                    http.post("/v1/prices", data=data).raise_for_status()
            yield server
        finally:
            server.stop()


@pytest.fixture
def settings(db_url, tmp_path, stand_in):
    offers._prices.clear()
    return make_settings(
        db_url,
        tmp_path,
        stripe_secret_key=SECRET_KEY,
        stripe_webhook_secret=WEBHOOK_SECRET,
        stripe_prices=PRICES,
        stripe_api_base=stand_in.base,
        public_url=APP,
    )


@pytest.fixture
async def pool(db_url):
    p = await asyncpg.create_pool(db_url, min_size=1, max_size=4)
    yield p
    await p.close()


async def linked(conn, user, customer: str) -> None:
    """What the webhook stores on checkout.session.completed: the user's Stripe customer."""
    await conn.execute(
        "insert into billing_customers (user_id, customer_id) values ($1, $2)", user.id, customer
    )


async def subscribed(conn, user, sub: dict, tier: str) -> None:
    """What the webhook stores on customer.subscription.created."""
    await conn.execute(
        "insert into billing_subscriptions (subscription_id, user_id, customer_id, price_id,"
        " tier, status, event_created) values ($1, $2, $3, $4, $5, $6, now())",
        sub["id"],
        user.id,
        sub["customer"],
        sub["items"]["data"][0]["price"]["id"],
        tier,
        sub["status"],
    )


def test_offer_labels_show_limits_and_price():
    premium = offers.Offer(
        "p", "premium", None, token_limit=500_000, amount=2000, currency="usd", interval="month"
    )
    assert premium.label("month") == "Premium — 500,000 tokens/month — $20.00/month"
    topup = offers.Offer("t", None, 50_000, amount=500, currency="usd")
    assert topup.label("month") == "Top-up — 50,000 tokens — $5.00"
    assert offers.Offer("u", "unlimited", None, amount=1000, currency="jpy").label("day") == (
        "Unlimited — unlimited tokens — 1,000 JPY"
    )
    # Stripe unreachable: the plan is still offered, its price shown at Checkout.
    assert offers.Offer("b", "basic", None, token_limit=100).label("week") == (
        "Basic — 100 tokens/week"
    )


async def test_stand_in_offers_read_tiers_and_stripe_prices(pool, settings):
    found = await offers.offers(pool, settings, make_client(settings))
    labels = [o.label("month") for o in found]
    assert labels == [
        "Basic — 100,000 tokens/month — $5.00/month",
        "Premium — 500,000 tokens/month — $20.00/month",
        "Top-up — 50,000 tokens — $5.00",
    ]
    basic_rank = await pool.fetchval("select rank from tiers where name = 'basic'")
    assert [o.price_id for o in offers.upgrades(found, basic_rank)] == [
        "price_premium",
        "price_topup",
    ]


async def test_stand_in_checkout_names_the_user_and_reuses_the_customer(
    pool, conn, settings, stand_in
):
    user = await add_user(conn)
    client = make_client(settings)
    first = await checkout.start(pool, settings, client, user.id, "price_premium", None)
    assert first.kind == "checkout" and first.url.startswith(stand_in.base + "/checkout/cs_test_")
    sent = stand_in.checkout_params[-1]
    who = {"vtai_user": str(user.id), "vtai_user_id": str(user.id)}
    assert sent["mode"] == "subscription"
    assert sent["client_reference_id"] == str(user.id)
    assert sent["metadata"] == who | {"vtai_price": "price_premium"}
    assert sent["subscription_data"]["metadata"] == who
    assert sent["line_items"] == [{"price": "price_premium", "quantity": "1"}]
    assert sent["success_url"] == APP + "/billing/return?session_id={CHECKOUT_SESSION_ID}"
    assert sent["cancel_url"].startswith(APP + "/billing/return")
    assert "customer" not in sent
    # The customer pays; the webhook links the customer Checkout made to the user.
    session_id = first.url.rsplit("/", 1)[1]
    session, _ = await stand_in.complete_checkout(session_id)
    await linked(conn, user, session["customer"])

    again = await checkout.start(pool, settings, client, user.id, "price_topup", None)
    assert again.kind == "checkout"
    sent = stand_in.checkout_params[-1]
    assert sent["customer"] == session["customer"] and "customer_email" not in sent
    assert sent["mode"] == "payment" and sent["payment_intent_data"]["metadata"] == who
    assert len(stand_in.checkout_params) == 2


async def test_stand_in_checkout_hands_over_the_profile_email(pool, conn, settings, stand_in):
    user = await add_user(conn)
    await conn.execute("update profiles set email = $1 where id = $2", "ada@example.com", user.id)
    await checkout.start(pool, settings, make_client(settings), user.id, "price_topup", None)
    sent = stand_in.checkout_params[-1]
    assert sent["customer_email"] == "ada@example.com" and sent["customer_creation"] == "always"


async def test_stand_in_a_subscriber_changes_plan_and_never_gets_a_second_subscription(
    pool, conn, settings, stand_in
):
    user = await add_user(conn)
    client = make_client(settings)
    first = await checkout.start(pool, settings, client, user.id, "price_basic", None)
    session, sub = await stand_in.complete_checkout(first.url.rsplit("/", 1)[1])
    await linked(conn, user, session["customer"])
    await subscribed(conn, user, sub, "basic")
    sessions_before = len(stand_in.checkout_params)

    moved = await checkout.start(pool, settings, client, user.id, "price_premium", None)

    assert moved.kind == "updated" and moved.url is None
    assert len(stand_in.checkout_params) == sessions_before
    # The upgrade is invoiced now and applies only once paid.
    assert {"path": f"/v1/subscriptions/{sub['id']}", "proration_behavior": "always_invoice"} in (
        stand_in.subscription_updates
    )
    assert {
        "path": f"/v1/subscriptions/{sub['id']}",
        "payment_behavior": "pending_if_incomplete",
    } in stand_in.subscription_updates
    listed = await client.v1.subscriptions.list_async(params={"customer": session["customer"]})
    assert [s.id for s in listed.data] == [sub["id"]]
    assert listed.data[0]["items"]["data"][0]["price"]["id"] == "price_premium"
    # Once the webhook has applied it, choosing it again changes nothing.
    await conn.execute(
        "update billing_subscriptions set price_id = 'price_premium', tier = 'premium'"
        " where subscription_id = $1",
        sub["id"],
    )
    same = await checkout.start(pool, settings, client, user.id, "price_premium", None)
    assert same.kind == "unchanged" and "already on the Premium plan" in same.words("month")
    # Down is at the period's end, through the portal; nothing changes while a card fails.
    await conn.execute("update profiles set tier = 'premium' where id = $1", user.id)
    with pytest.raises(checkout.BillingError, match="end of your period"):
        await checkout.start(pool, settings, client, user.id, "price_basic", None)
    await conn.execute("update billing_subscriptions set status = 'past_due'")
    with pytest.raises(checkout.BillingError, match="payment failed"):
        await checkout.start(pool, settings, client, user.id, "price_basic", None)


async def test_stand_in_portal_needs_a_customer_and_returns_to_the_app(
    pool, conn, settings, stand_in
):
    user = await add_user(conn)
    client = make_client(settings)
    with pytest.raises(checkout.BillingError, match="no billing account yet"):
        await checkout.portal(pool, settings, client, user.id, None)
    await linked(conn, user, "cus_portal_test")
    url = await checkout.portal(pool, settings, client, user.id, None)
    assert url.startswith(stand_in.base + "/portal/bps_")
    assert stand_in.portal_params[-1] == {
        "customer": "cus_portal_test",
        "return_url": APP + "/billing/return",
    }


async def test_unknown_price_and_missing_address_are_one_line(pool, conn, settings):
    user = await add_user(conn)
    client = make_client(settings)
    with pytest.raises(checkout.BillingError, match="not on sale"):
        await checkout.start(pool, settings, client, user.id, "price_made_up", None)
    anywhere = settings.model_copy(update={"public_url": None})
    with pytest.raises(checkout.BillingError, match="VTAI_PUBLIC_URL"):
        await checkout.start(pool, anywhere, client, user.id, "price_premium", None)


# --- over HTTP -------------------------------------------------------------------------------


def sign_in(client: httpx.AsyncClient, profile) -> None:
    meta = {"id": str(profile.id), "tier": profile.tier, "is_admin": profile.is_admin}
    client.cookies.set("access_token", create_jwt(User(identifier=profile.username, metadata=meta)))


@pytest.fixture
async def http(pool, settings, monkeypatch):
    monkeypatch.setenv("CHAINLIT_AUTH_SECRET", AUTH_SECRET)
    app = FastAPI()
    checkout.register(app, get_pool=lambda: pool, get_settings=lambda: settings)
    async for url in serve(app):
        async with httpx.AsyncClient(base_url=url) as c:
            yield c


async def test_stand_in_routes_sign_in_offer_start_and_confirm(http, conn, stand_in):
    assert (await http.get("/billing/plans")).status_code == 401
    user = await add_user(conn)
    sign_in(http, user)
    plans = (await http.get("/billing/plans")).json()
    assert plans["tier"] == "free" and plans["manage"] is False and plans["subscription"] is None
    assert plans["upgrades"] == ["price_basic", "price_premium", "price_topup"]
    assert plans["offers"][1]["label"] == "Premium — 500,000 tokens/month — $20.00/month"
    # Another site's page can't start a payment with the user's cookie.
    foreign = await http.post(
        "/billing/checkout", json={"price": "price_premium"}, headers={"Origin": "http://evil.test"}
    )
    assert foreign.status_code == 403
    assert (await http.post("/billing/checkout", json={})).status_code == 400
    started = (await http.post("/billing/checkout", json={"price": "price_premium"})).json()
    assert started["kind"] == "checkout" and started["url"].startswith(stand_in.base)
    session_id = started["url"].rsplit("/", 1)[1]

    page = await http.get(f"/billing/return?session_id={session_id}")
    assert page.status_code == 200 and "being confirmed" in page.text
    assert (await http.get(f"/billing/status?session_id={session_id}")).json()["state"] == "open"
    session, sub = await stand_in.complete_checkout(session_id)
    assert (await http.get(f"/billing/status?session_id={session_id}")).json()["state"] == "paid"
    # The webhook lands (vtai.billing.webhook's work, written here as it writes it).
    await linked(conn, user, session["customer"])
    await subscribed(conn, user, sub, "premium")
    await conn.execute("update profiles set tier = 'premium' where id = $1", user.id)
    status = (await http.get(f"/billing/status?session_id={session_id}")).json()
    assert status == {
        "state": "confirmed",
        "tier": "premium",
        "token_limit": 500_000,
        "period": "month",
    }
    # Someone else's session is as unknown as a made-up one.
    other = await add_user(conn)
    sign_in(http, other)
    assert (await http.get(f"/billing/status?session_id={session_id}")).status_code == 404
    assert (await http.get("/billing/status?session_id=cs_test_nope")).status_code == 404


async def test_billing_off_hides_every_route_and_offer(pool, conn, db_url, tmp_path, monkeypatch):
    monkeypatch.setenv("CHAINLIT_AUTH_SECRET", AUTH_SECRET)
    off = make_settings(db_url, tmp_path)
    assert not off.billing and make_client(off) is None
    assert await offers.offers(pool, off, None) == []
    user = await add_user(conn)
    with pytest.raises(checkout.BillingError, match="ask the administrator"):
        await checkout.start(pool, off, None, user.id, "price_premium", None)
    app = FastAPI()
    checkout.register(app, get_pool=lambda: pool, get_settings=lambda: off)
    async for url in serve(app):
        async with httpx.AsyncClient(base_url=url) as http:
            sign_in(http, user)
            for method, path in (
                ("GET", "/billing/plans"),
                ("POST", "/billing/checkout"),
                ("POST", "/billing/portal"),
                ("GET", "/billing/return"),
                ("GET", "/billing/status"),
            ):
                assert (await http.request(method, path)).status_code == 404, path


async def test_stand_in_no_secret_in_logs_even_when_stripe_fails(pool, conn, settings, caplog):
    caplog.set_level(logging.DEBUG)
    user = await add_user(conn)
    await linked(conn, user, "cus_logs")
    client = make_client(settings)
    await checkout.start(pool, settings, client, user.id, "price_premium", None)
    await checkout.portal(pool, settings, client, user.id, None)
    # Stripe down: the user gets one line, the log names the failure, not the request.
    dead = stripe.StripeClient(
        SECRET_KEY,
        base_addresses={"api": "http://127.0.0.1:9"},
        http_client=stripe.HTTPXClient(),
        max_network_retries=0,
    )
    with pytest.raises(checkout.BillingError, match="try again"):
        await checkout.portal(pool, settings, dead, user.id, None)
    assert "Stripe open the billing portal failed (APIConnectionError)" in caplog.text
    logged = caplog.text + " ".join(repr(r.args) for r in caplog.records)
    for secret in (SECRET_KEY, WEBHOOK_SECRET):
        assert secret not in logged
