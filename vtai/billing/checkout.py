"""How a user pays: a Stripe Checkout session for a plan or a top-up, a change of the plan of
the subscription they already have, and Stripe's customer portal (docs/billing.md).

Choosing a tier's Price:
- with a live subscription (billing_subscriptions: active, trialing or past_due) its item moves
  to the new Price, prorated by Stripe: a user never holds two subscriptions;
- otherwise a Checkout session, whose `client_reference_id`, `metadata.vtai_user` (and the
  subscription's or payment's metadata) name the VT.ai user, so the webhook knows whom it paid
  for. The Stripe customer of billing_customers is reused; without one, the profile's email (if
  any) is handed to Checkout, which makes the customer.

A top-up is always a one-time Checkout payment. Nothing here changes a tier or adds a grant:
the webhook (webhook.py) does, when Stripe says the money is there. Until then /billing/return
polls /billing/status, and the chat's next turn is gated by whatever profiles.tier says then.

Every route answers 404 with billing off (no STRIPE_SECRET_KEY), and needs the chat's login
(the session cookie, checked as /account checks it). Stripe's errors are logged by class and
code only (their text can quote the request) and reach the user as one line.

No `from __future__ import annotations`: FastAPI must see the route annotations as objects.
"""

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import asyncpg
import stripe
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse

from vtai.billing import offers as catalogue
from vtai.billing.client import make_client
from vtai.billing.offers import Offer, field
from vtai.settings import Settings

log = logging.getLogger(__name__)

# Statuses of a subscription that is still the user's: a new plan changes it, never adds one.
LIVE = ("active", "trialing", "past_due")
RETURN_PATH = "/billing/return"
PUBLIC = Path(__file__).resolve().parents[2] / "public" / "account"
RETURN_PAGE = PUBLIC / "return.html"
NO_STORE = {"Cache-Control": "no-store"}


class BillingError(Exception):
    """Why a payment could not start, in one line for the user."""


@dataclass(frozen=True)
class Started:
    # checkout: pay at `url`; updated: the subscription moves to the offer's Price;
    # unchanged: the subscription is already on it
    kind: str
    offer: Offer
    url: str | None = None

    def words(self, period: str) -> str:
        """What the chat and /account say about it."""
        name = self.offer.name()
        if self.kind == "unchanged":
            return f"You are already on the {name} plan."
        if self.kind == "updated":
            return (
                f"Your subscription moves to {self.offer.label(period)}; Stripe prorates the "
                "difference. The new limit applies as soon as Stripe confirms the change, "
                "usually within seconds: no reload needed."
            )
        return f"Pay for {self.offer.label(period)} with Stripe:"


_client: tuple[Settings, Any] | None = None


def client_for(settings: Settings):
    """The one Stripe client of these settings (None with billing off)."""
    global _client
    if _client is None or _client[0] is not settings:
        _client = (settings, make_client(settings))
    return _client[1]


def app_base(settings: Settings, origin: str | None) -> str:
    """Where Stripe sends the user back: VTAI_PUBLIC_URL, else the origin they came from."""
    if settings.public_url:
        return settings.public_url.rstrip("/")
    parts = urlsplit(origin or "")
    if parts.scheme in ("http", "https") and parts.netloc:
        return f"{parts.scheme}://{parts.netloc}"
    raise BillingError(
        "The app's address is unknown (no Origin on the request): set VTAI_PUBLIC_URL."
    )


async def customer_of(conn, user_id: uuid.UUID) -> str | None:
    return await conn.fetchval(
        "select customer_id from public.billing_customers where user_id = $1", user_id
    )


async def subscription_of(conn, user_id: uuid.UUID) -> asyncpg.Record | None:
    """The user's live subscription, the one ending last if Stripe holds more than one."""
    return await conn.fetchrow(
        "select subscription_id, customer_id, price_id, tier, status, current_period_end,"
        " cancel_at_period_end from public.billing_subscriptions"
        " where user_id = $1 and status = any($2::text[])"
        " order by current_period_end desc nulls last, updated_at desc limit 1",
        user_id,
        list(LIVE),
    )


async def _profile(conn, user_id: uuid.UUID) -> asyncpg.Record:
    row = await conn.fetchrow(
        "select p.tier, t.rank, p.email from public.profiles p"
        " join public.tiers t on t.name = p.tier where p.id = $1 and p.disabled_at is null",
        user_id,
    )
    if row is None:
        raise BillingError("Your account no longer exists: sign in again.")
    return row


def _stripe_failed(what: str, exc: Exception) -> BillingError:
    code = getattr(exc, "code", None)
    log.warning("Stripe %s failed (%s%s)", what, type(exc).__name__, f", {code}" if code else "")
    return BillingError(f"Stripe could not {what} just now: try again in a minute.")


async def start(
    pool: asyncpg.Pool,
    settings: Settings,
    client,
    user_id: uuid.UUID,
    price_id: str,
    origin: str | None,
) -> Started:
    """Start buying `price_id` for the user: change their subscription, or a Checkout session."""
    if client is None:
        raise BillingError("Billing is off on this server: ask the administrator.")
    offer = next(
        (o for o in await catalogue.offers(pool, settings, client) if o.price_id == price_id),
        None,
    )
    if offer is None:
        raise BillingError("That plan is not on sale any more: choose another.")
    async with pool.acquire() as conn:
        profile = await _profile(conn, user_id)
        customer = await customer_of(conn, user_id)
        subscription = await subscription_of(conn, user_id) if offer.kind == "tier" else None
    if subscription is not None:
        if subscription["price_id"] == price_id and not subscription["cancel_at_period_end"]:
            return Started("unchanged", offer)
        if subscription["status"] == "past_due":
            # Otherwise a failing card would buy the top tier for the whole grace period.
            raise BillingError(
                "Your last payment failed: update your card under Manage billing, then upgrade."
            )
        if subscription["price_id"] != price_id and offer.rank < profile["rank"]:
            # An immediate downgrade would credit the unused higher tier after its tokens were
            # spent; Stripe's portal moves to a smaller plan at the period's end instead.
            raise BillingError(
                "A smaller plan starts at the end of your period: choose it under Manage billing."
            )
        await _change_plan(client, subscription, price_id, user_id)
        return Started("updated", offer)
    url = await _checkout(client, settings, offer, user_id, customer, profile["email"], origin)
    return Started("checkout", offer, url)


async def _change_plan(client, subscription, price_id: str, user_id: uuid.UUID) -> None:
    sub_id = subscription["subscription_id"]
    try:
        current = await client.v1.subscriptions.retrieve_async(sub_id)
        items = field(field(current, "items"), "data") or []
        if len(items) != 1:
            # VT.ai makes one-item subscriptions; another shape was made by hand in Stripe.
            raise BillingError(
                "Your subscription has several items, so it can't be changed here: use "
                "Manage billing."
            )
        params: dict[str, Any] = {
            "items": [{"id": field(items[0], "id"), "price": price_id}],
            # The difference is invoiced and paid now, and the new Price (so the new tier)
            # applies only once it is: an upgrade is never used before it is paid for.
            "proration_behavior": "always_invoice",
            "payment_behavior": "pending_if_incomplete",
            "metadata": {"vtai_user": str(user_id), "vtai_user_id": str(user_id)},
        }
        if subscription["cancel_at_period_end"]:
            # Choosing a plan means keeping the subscription.
            params["cancel_at_period_end"] = False
        await client.v1.subscriptions.update_async(sub_id, params=params)
    except stripe.StripeError as exc:
        raise _stripe_failed("change your subscription", exc) from None


async def _checkout(
    client,
    settings: Settings,
    offer: Offer,
    user_id: uuid.UUID,
    customer: str | None,
    email: str | None,
    origin: str | None,
) -> str:
    base = app_base(settings, origin)
    # vtai_user as the brief names it, vtai_user_id as the webhook reads it (vtai.billing.events).
    who = {"vtai_user": str(user_id), "vtai_user_id": str(user_id)}
    params: dict[str, Any] = {
        "mode": offer.mode,
        "line_items": [{"price": offer.price_id, "quantity": 1}],
        "client_reference_id": str(user_id),
        "metadata": who | {"vtai_price": offer.price_id},
        "success_url": f"{base}{RETURN_PATH}?session_id={{CHECKOUT_SESSION_ID}}",
        "cancel_url": f"{base}{RETURN_PATH}?canceled=1",
    }
    if offer.mode == "subscription":
        params["subscription_data"] = {"metadata": who}
    else:
        params["payment_intent_data"] = {"metadata": who}
    if customer:
        params["customer"] = customer
    else:
        if email:
            params["customer_email"] = email
        if offer.mode == "payment":
            # A payment makes no customer by default; one is needed for the portal and refunds.
            params["customer_creation"] = "always"
    try:
        session = await client.v1.checkout.sessions.create_async(params=params)
    except stripe.StripeError as exc:
        raise _stripe_failed("open the payment page", exc) from None
    url = field(session, "url")
    if not url:
        raise BillingError("Stripe opened no payment page: try again in a minute.")
    return url


async def portal(
    pool: asyncpg.Pool, settings: Settings, client, user_id: uuid.UUID, origin: str | None
) -> str:
    """The URL of the user's Stripe customer portal session."""
    if client is None:
        raise BillingError("Billing is off on this server: ask the administrator.")
    async with pool.acquire() as conn:
        customer = await customer_of(conn, user_id)
    if customer is None:
        raise BillingError("You have no billing account yet: choose a plan first.")
    params = {"customer": customer, "return_url": f"{app_base(settings, origin)}{RETURN_PATH}"}
    try:
        session = await client.v1.billing_portal.sessions.create_async(params=params)
    except stripe.StripeError as exc:
        raise _stripe_failed("open the billing portal", exc) from None
    return field(session, "url")


async def account(pool: asyncpg.Pool, settings: Settings, client, user_id: uuid.UUID) -> dict:
    """What /account and the chat show: the plan now, the plans on sale, the subscription."""
    all_offers = await catalogue.offers(pool, settings, client)
    async with pool.acquire() as conn:
        profile = await _profile(conn, user_id)
        customer = await customer_of(conn, user_id)
        subscription = await subscription_of(conn, user_id)
    period = settings.usage_period
    return {
        "tier": profile["tier"],
        "period": period,
        "offers": [o.as_dict(period) for o in all_offers],
        "upgrades": [o.price_id for o in catalogue.upgrades(all_offers, profile["rank"])],
        "manage": customer is not None,
        "subscription": None
        if subscription is None
        else {
            "tier": subscription["tier"],
            "price_id": subscription["price_id"],
            "status": subscription["status"],
            "current_period_end": _iso(subscription["current_period_end"]),
            "cancel_at_period_end": subscription["cancel_at_period_end"],
        },
    }


def _iso(at) -> str | None:
    return at.isoformat() if at else None


async def status(
    pool: asyncpg.Pool, settings: Settings, client, user_id: uuid.UUID, session_id: str | None
) -> dict:
    """Has the webhook landed for this Checkout session? `state`: confirmed (the plan or the
    top-up is in the database), paid (Stripe has the money, the webhook has not landed yet),
    open (not paid), or none (no session asked about). Always the plan as it is now."""
    state = "none"
    if session_id:
        state = await _session_state(pool, client, user_id, session_id)
    async with pool.acquire() as conn:
        plan = await conn.fetchrow(
            "select p.tier, t.token_limit from public.profiles p"
            " join public.tiers t on t.name = p.tier where p.id = $1",
            user_id,
        )
    return {
        "state": state,
        "tier": plan["tier"] if plan else None,
        "token_limit": plan["token_limit"] if plan else None,
        "period": settings.usage_period,
    }


async def _session_state(pool, client, user_id: uuid.UUID, session_id: str) -> str:
    try:
        session = await client.v1.checkout.sessions.retrieve_async(session_id)
    except stripe.InvalidRequestError:
        raise HTTPException(404, "session_id: no such Checkout session") from None
    except stripe.StripeError as exc:
        raise HTTPException(502, str(_stripe_failed("read the payment", exc))) from None
    owner = field(session, "client_reference_id")
    if owner != str(user_id):
        # Someone else's session is as unknown as a made-up one.
        raise HTTPException(404, "session_id: no such Checkout session")
    if field(session, "status") != "complete":
        return "open"
    async with pool.acquire() as conn:
        if field(session, "mode") == "subscription":
            landed = await conn.fetchval(
                "select exists (select 1 from public.billing_subscriptions s join"
                " public.profiles p on p.id = s.user_id and p.tier = s.tier"
                " where s.subscription_id = $1 and s.user_id = $2)",
                _id(field(session, "subscription")),
                user_id,
            )
        else:
            landed = await conn.fetchval(
                "select exists (select 1 from public.token_grants"
                " where ref = $1 and end_user = $2)",
                _id(field(session, "payment_intent")),
                user_id,
            )
    return "confirmed" if landed else "paid"


def _id(value) -> str | None:
    """An expandable Stripe field: its id whether expanded or not."""
    return field(value, "id") if value is not None and not isinstance(value, str) else value


# --- Routes ----------------------------------------------------------------------------------


def _services_pool() -> asyncpg.Pool:
    from vtai.settings import NEEDS_DATABASE
    from vtai.ui import chat

    db = chat.services().db
    if db is None:
        raise HTTPException(503, f"Billing {NEEDS_DATABASE}")
    return db.pool


def _services_settings() -> Settings:
    from vtai.ui import chat

    return chat.services().settings


def build_router(
    get_pool: Callable[[], asyncpg.Pool] | None = None,
    get_settings: Callable[[], Settings] | None = None,
    get_client: Callable[[Settings], Any] | None = None,
) -> APIRouter:
    from vtai.admin.auth import NotSignedIn, same_origin, user_from_request

    get_pool = get_pool or _services_pool
    get_settings = get_settings or _services_settings
    get_client = get_client or client_for

    def billing_on() -> Settings:
        settings = get_settings()
        if not settings.billing:
            raise HTTPException(404, "Not Found")
        return settings

    async def require_user(request: Request) -> asyncpg.Record:
        try:
            return await user_from_request(request, get_pool())
        except NotSignedIn:
            raise HTTPException(401, "sign in first") from None

    User = Annotated[asyncpg.Record, Depends(require_user)]
    router = APIRouter(dependencies=[Depends(same_origin), Depends(billing_on)])

    def origin(request: Request) -> str:
        return request.headers.get("origin") or str(request.base_url)

    @router.get("/billing/plans")
    async def plans(user: User):
        settings = get_settings()
        body = await account(get_pool(), settings, get_client(settings), user["id"])
        return JSONResponse(body, headers=NO_STORE)

    @router.post("/billing/checkout")
    async def checkout(request: Request, user: User):
        try:
            body = await request.json()
        except ValueError:
            body = None
        price = body.get("price") if isinstance(body, dict) else None
        if not isinstance(price, str):
            raise HTTPException(400, 'price: send {"price": "<a price id of /billing/plans>"}')
        settings = get_settings()
        try:
            started = await start(
                get_pool(), settings, get_client(settings), user["id"], price, origin(request)
            )
        except BillingError as exc:
            raise HTTPException(409, str(exc)) from None
        return JSONResponse(
            {
                "kind": started.kind,
                "url": started.url,
                "message": started.words(settings.usage_period),
            },
            headers=NO_STORE,
        )

    @router.post("/billing/portal")
    async def open_portal(request: Request, user: User):
        settings = get_settings()
        try:
            url = await portal(
                get_pool(), settings, get_client(settings), user["id"], origin(request)
            )
        except BillingError as exc:
            raise HTTPException(409, str(exc)) from None
        return JSONResponse({"url": url}, headers=NO_STORE)

    @router.get(RETURN_PATH, include_in_schema=False)
    async def return_page(request: Request):
        try:
            await user_from_request(request, get_pool())
        except NotSignedIn:
            return RedirectResponse("/login", status_code=303)
        return FileResponse(RETURN_PAGE, headers=NO_STORE)

    @router.get("/billing/status")
    async def check(user: User, session_id: str | None = None):
        if session_id is not None and not (0 < len(session_id) <= 255):
            raise HTTPException(400, "session_id: at most 255 characters")
        settings = get_settings()
        body = await status(get_pool(), settings, get_client(settings), user["id"], session_id)
        return JSONResponse(body, headers=NO_STORE)

    return router


def register(app, **dependencies) -> None:
    """Add this module's routes ahead of Chainlit's catch-all `/{full_path:path}`. Calling it
    again (Chainlit's --watch re-imports main.py) replaces them."""
    app.router.routes[:] = [r for r in app.router.routes if not getattr(r, "vtai_checkout", False)]
    before = len(app.router.routes)
    app.include_router(build_router(**dependencies))
    added = app.router.routes[before:]
    for route in added:
        route.vtai_checkout = True
    del app.router.routes[before:]
    app.router.routes[0:0] = added
