"""`POST /billing/webhook`: Stripe's events, verified, stored once and applied in the database.

The signature is checked over the raw body by the official library
(`stripe.Webhook.construct_event`, Stripe's 300 s tolerance): no signature, a wrong one or a
stale timestamp is a 400 and nothing is stored. A verified event becomes one SQL call
(vtai.billing.events -> functions/50_billing.sql) that stores it in `billing_events` and applies
it in one transaction, so a duplicate (Stripe retries, replays) answers 200 and changes nothing.
A database error answers 503, and Stripe delivers the event again later.

With a database URL the call goes over the pool; in Supabase REST-only mode the same functions
are called over PostgREST's /rpc. Billing off (no STRIPE_SECRET_KEY): 404.
Never logged: the signing secret, the Stripe-Signature header.
"""

from __future__ import annotations

import json
import logging

import asyncpg
import stripe
from fastapi import APIRouter, FastAPI, Request
from starlette.responses import JSONResponse

from vtai.billing import events
from vtai.billing.client import make_client

log = logging.getLogger(__name__)

PATH = "/billing/webhook"
# Stripe's events are far below this; a larger body is not Stripe's.
MAX_BODY = 1024 * 1024


def _services():
    from vtai.ui import chat

    return chat.services()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _body(request: Request) -> bytes | None:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def _line_items(settings, session_id: str) -> list[dict] | None:
    """What a one-time Checkout session bought, asked of Stripe (an event never carries it)."""
    client = make_client(settings)
    if client is None:
        return None
    page = await client.checkout.sessions.line_items.list_async(session_id, {"limit": 100})
    return [
        {"price": item.price.id if item.price else None, "quantity": item.quantity}
        for item in page.data
    ]


async def apply(services, call: events.Call) -> dict | None:
    """Run the event's SQL call: its one result row, or None when there is no way to the
    database's functions."""
    if services.db is not None:
        query, values = call.sql()
        async with services.db.pool.acquire() as conn:
            row = await conn.fetchrow(query, *values)
        return dict(row) if row is not None else None
    if services.store is not None:
        rows = await services.store._rpc(call.function, call.rpc_params())
        return rows[0] if rows else None
    return None


def _unavailable(services, exc: BaseException) -> bool:
    if services.db is None and services.store is not None:
        return services.store.is_unavailable(exc)
    return isinstance(
        exc, OSError | TimeoutError | asyncpg.PostgresConnectionError | asyncpg.InterfaceError
    ) or (getattr(exc, "sqlstate", None) or "").startswith(("08", "57P", "53"))


async def stripe_webhook(request: Request):
    try:
        services = _services()
    except RuntimeError:
        return _error(503, "VT.ai is starting: Stripe will deliver the event again.")
    settings = services.settings
    if not settings.billing or settings.stripe_webhook_secret is None:
        return _error(404, "Billing is off: set STRIPE_SECRET_KEY and STRIPE_WEBHOOK_SECRET.")
    body = await _body(request)
    if body is None:
        return _error(413, f"The body is over {MAX_BODY} bytes: not a Stripe event.")
    signature = request.headers.get("stripe-signature")
    if not signature:
        return _error(400, "No Stripe-Signature header: only Stripe's signed events are taken.")
    try:
        payload = body.decode("utf-8")
        stripe.Webhook.construct_event(
            payload, signature, settings.stripe_webhook_secret.get_secret_value()
        )
        event = json.loads(payload)
    except stripe.SignatureVerificationError as exc:
        # The exception carries the header: only its kind is told.
        if "tolerance" in (exc.user_message or ""):
            return _error(400, "The signature's timestamp is older than Stripe's tolerance.")
        return _error(400, "The Stripe-Signature does not match (STRIPE_WEBHOOK_SECRET).")
    except ValueError:
        return _error(400, "The body is not a JSON Stripe event.")
    if not isinstance(event, dict):
        return _error(400, "The body is not a JSON Stripe event.")

    grace = settings.billing_grace_days
    try:
        line_items = None
        session_id = events.needs_line_items(event)
        if session_id is not None:
            line_items = await _line_items(settings, session_id)
        call = events.parse(event, settings.stripe_prices, settings.usage_period, grace, line_items)
    except events.BadEvent as exc:
        log.warning("stripe event %s refused: %s", event.get("id"), exc)
        return _error(400, f"Unreadable event: {exc}")
    except stripe.StripeError as exc:
        log.warning("stripe event %s: its line items could not be read: %s", event.get("id"), exc)
        return _error(503, "Stripe could not be asked what was bought: it will deliver again.")

    if services.db is None and services.store is None:
        return _error(503, "Billing needs the database: set SUPABASE_DB_URL.")
    try:
        result = await apply(services, call)
    except Exception as exc:
        # Stripe retries a failed delivery for days: the event is applied once it goes through.
        log.error(
            "stripe event %s (%s) not applied: %s: %s",
            call.args["p_event_id"],
            call.args["p_type"],
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
        )
        if _unavailable(services, exc):
            return _error(503, "The database is unavailable: Stripe will deliver the event again.")
        return _error(500, "The event could not be applied: the server log says why.")
    result = result or {}
    applied = bool(result.get("applied"))
    outcome = result.get("outcome") or ("duplicate" if not applied else "")
    log.info("stripe event %s %s: %s", call.args["p_event_id"], call.args["p_type"], outcome)
    return JSONResponse(
        {
            "received": True,
            "applied": applied,
            "outcome": outcome,
        }
    )


def build_router() -> APIRouter:
    router = APIRouter()
    router.add_api_route(PATH, stripe_webhook, methods=["POST"], include_in_schema=False)
    return router


def register(app: FastAPI) -> None:
    """Add the webhook ahead of Chainlit's catch-all route (again on a re-import, replacing it)."""
    app.router.routes[:] = [
        r for r in app.router.routes if not getattr(r, "vtai_billing_webhook", False)
    ]
    before = len(app.router.routes)
    app.include_router(build_router())
    added = app.router.routes[before:]
    for route in added:
        route.vtai_billing_webhook = True
    del app.router.routes[before:]
    app.router.routes[0:0] = added
