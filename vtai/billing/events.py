"""A verified Stripe event as the SQL call that applies it (supabase/migrations/functions/
50_billing.sql). Pure: reads the event (the 2025-03-31.basil shapes, vtai.billing.client) and
VTAI_STRIPE_PRICES, decides nothing about tiers or grants; the database does.

Who the user is: `metadata.vtai_user_id` (set by vtai.billing.checkout on the Checkout session
and on the subscription it creates), else the session's `client_reference_id`, else the
customer already linked to a user.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

# Where VT.ai's user id and the Price bought travel on Stripe objects.
USER_KEY = "vtai_user_id"
PRICE_KEY = "vtai_price"

SUBSCRIPTION_EVENTS = frozenset(
    {
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
    }
)
CHECKOUT_EVENTS = frozenset(
    {"checkout.session.completed", "checkout.session.async_payment_succeeded"}
)
INVOICE_EVENTS = frozenset({"invoice.paid", "invoice.payment_failed"})
REFUND_EVENTS = frozenset({"charge.refunded"})
# A chargeback takes the money back like a whole refund: the grant it paid for goes too.
DISPUTE_EVENTS = frozenset({"charge.dispute.created"})
CUSTOMER_DELETED = "customer.deleted"


class BadEvent(ValueError):
    """A signed event VT.ai can't read; str() is one line."""


@dataclass(frozen=True)
class Call:
    """One SQL function and its named arguments, in its parameter order."""

    function: str
    args: dict[str, Any]

    def sql(self) -> tuple[str, list[Any]]:
        """`select * from fn(p_a => $1, ...)` for asyncpg, jsonb passed as JSON text."""
        parts, values = [], []
        for i, (name, value) in enumerate(self.args.items(), start=1):
            if name == "p_payload":
                parts.append(f"{name} => ${i}::text::jsonb")
                value = json.dumps(value, separators=(",", ":"))
            else:
                parts.append(f"{name} => ${i}")
            values.append(value)
        return f"select * from public.{self.function}({', '.join(parts)})", values

    def rpc_params(self) -> dict[str, Any]:
        """The same arguments as JSON for PostgREST's /rpc."""
        out = {}
        for name, value in self.args.items():
            if isinstance(value, datetime):
                value = value.isoformat()
            elif isinstance(value, uuid.UUID):
                value = str(value)
            out[name] = value
        return out


def _time(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadEvent(f"a timestamp is not a number: {value!r}"[:200])
    return datetime.fromtimestamp(value, UTC)


def _id(value: Any) -> str | None:
    """An id, or the id of an expanded object."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


def _user(*candidates: Any) -> uuid.UUID | None:
    for value in candidates:
        if isinstance(value, str):
            try:
                return uuid.UUID(value)
            except ValueError:
                continue
    return None


def _metadata(obj: dict) -> dict:
    metadata = obj.get("metadata")
    return metadata if isinstance(metadata, dict) else {}


def _topup(prices: dict[str, Any], price: str | None) -> int | None:
    what = prices.get(price) if price else None
    return what.get("topup_tokens") if isinstance(what, dict) else None


def _tier(prices: dict[str, Any], price: str | None) -> str | None:
    what = prices.get(price) if price else None
    return what if isinstance(what, str) else None


def needs_line_items(event: dict) -> str | None:
    """The Checkout session id whose line items must be fetched to know what a paid one-time
    checkout bought (no `metadata.vtai_price`, no expanded `line_items`); else None."""
    if event.get("type") not in CHECKOUT_EVENTS:
        return None
    obj = _object(event)
    if obj.get("mode") != "payment" or _metadata(obj).get(PRICE_KEY):
        return None
    if isinstance(obj.get("line_items"), dict):
        return None
    return _id(obj.get("id"))


def _object(event: dict) -> dict:
    data = event.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    if not isinstance(obj, dict):
        raise BadEvent("the event has no data.object")
    return obj


def parse(
    event: dict,
    prices: dict[str, Any],
    period: str = "month",
    grace_days: int = 7,
    line_items: list[dict] | None = None,
) -> Call:
    """The call that applies `event`. `line_items`: a Checkout session's, when fetched."""
    event_id, kind = event.get("id"), event.get("type")
    if not isinstance(event_id, str) or not event_id or not isinstance(kind, str):
        raise BadEvent("the event has no id or type")
    created = _time(event.get("created"))
    if created is None:
        raise BadEvent("the event has no created time")
    head = {"p_event_id": event_id, "p_type": kind, "p_created": created}
    if kind in CHECKOUT_EVENTS:
        return _checkout(head, event, prices, line_items, period)
    if kind in SUBSCRIPTION_EVENTS:
        return _subscription(head, event, prices, grace_days)
    if kind in INVOICE_EVENTS:
        obj = _object(event)
        return Call(
            "vtai_billing_invoice",
            {
                **head,
                "p_customer": _id(obj.get("customer")),
                "p_subscription": _invoice_subscription(obj),
                "p_grace_days": grace_days,
                "p_payload": event,
            },
        )
    if kind in REFUND_EVENTS:
        obj = _object(event)
        amount, refunded = obj.get("amount"), obj.get("amount_refunded")
        if not isinstance(amount, int) or not isinstance(refunded, int):
            raise BadEvent("charge.refunded without amount and amount_refunded")
        return Call(
            "vtai_billing_refund",
            {
                **head,
                "p_ref": _id(obj.get("payment_intent")),
                "p_amount": amount,
                "p_amount_refunded": refunded,
                "p_payload": event,
                # vtai_reserve's counter row is the one for this period.
                "p_period": period,
            },
        )
    if kind in DISPUTE_EVENTS:
        obj = _object(event)
        amount = obj.get("amount")
        if not isinstance(amount, int):
            raise BadEvent("charge.dispute.created without amount")
        return Call(
            "vtai_billing_refund",
            {
                **head,
                "p_ref": _id(obj.get("payment_intent")),
                "p_amount": amount,
                "p_amount_refunded": amount,
                "p_payload": event,
                "p_period": period,
            },
        )
    if kind == CUSTOMER_DELETED:
        customer = _id(_object(event).get("id"))
        if customer is None:
            raise BadEvent("customer.deleted without the customer's id")
        return Call(
            "vtai_billing_customer_deleted",
            {**head, "p_customer": customer, "p_payload": event},
        )
    return Call("vtai_billing_record", {**head, "p_payload": event})


def _checkout(
    head: dict, event: dict, prices: dict, line_items: list[dict] | None, period: str
) -> Call:
    obj = _object(event)
    metadata = _metadata(obj)
    args = {
        **head,
        "p_user": _user(metadata.get(USER_KEY), obj.get("client_reference_id")),
        "p_customer": _id(obj.get("customer")),
        "p_payload": event,
    }
    # Only a paid one-time checkout grants tokens (an async payment method pays later, with
    # checkout.session.async_payment_succeeded).
    if obj.get("mode") == "payment" and obj.get("payment_status") == "paid":
        tokens = 0
        price = metadata.get(PRICE_KEY)
        if price:
            tokens = _topup(prices, price) or 0
        else:
            items = line_items
            if items is None and isinstance(obj.get("line_items"), dict):
                items = obj["line_items"].get("data")
            for item in items or []:
                per = _topup(prices, _id(item.get("price")))
                quantity = item.get("quantity")
                if per:
                    tokens += per * (quantity if isinstance(quantity, int) else 1)
        if tokens > 0:
            ref = _id(obj.get("payment_intent"))
            if ref is None:
                raise BadEvent("a paid top-up checkout without its payment_intent")
            args.update(p_grant_tokens=tokens, p_grant_ref=ref)
    args["p_period"] = period  # a grant lasts to the end of the user's period
    return Call("vtai_billing_checkout", args)


def _subscription(head: dict, event: dict, prices: dict, grace_days: int) -> Call:
    obj = _object(event)
    items = obj.get("items")
    items = items.get("data") if isinstance(items, dict) else None
    items = [i for i in items or [] if isinstance(i, dict)]
    # The item whose Price is a tier decides; else the first (its Price is kept, unmapped).
    item = next((i for i in items if _tier(prices, _price(i))), items[0] if items else {})
    price = _price(item)
    status = obj.get("status")
    if head["p_type"] == "customer.subscription.deleted":
        status = "canceled"
    if not isinstance(status, str) or not status:
        raise BadEvent("a subscription event without a status")
    subscription = _id(obj.get("id"))
    if subscription is None:
        raise BadEvent("a subscription event without the subscription's id")
    # 2025-03-31.basil: the period is on the item; older shapes kept it on the subscription.
    start = item.get("current_period_start", obj.get("current_period_start"))
    end = item.get("current_period_end", obj.get("current_period_end"))
    return Call(
        "vtai_billing_subscription",
        {
            **head,
            "p_user": _user(_metadata(obj).get(USER_KEY)),
            "p_customer": _id(obj.get("customer")),
            "p_subscription": subscription,
            "p_status": status,
            "p_price": price,
            "p_tier": _tier(prices, price),
            "p_period_start": _time(start),
            "p_period_end": _time(end),
            "p_cancel_at_period_end": bool(obj.get("cancel_at_period_end")),
            "p_grace_days": grace_days,
            "p_payload": event,
        },
    )


def _price(item: dict) -> str | None:
    return _id(item.get("price")) or _id(item.get("plan"))


def _invoice_subscription(obj: dict) -> str | None:
    """2025-03-31.basil moved an invoice's subscription to parent.subscription_details."""
    parent = obj.get("parent")
    if isinstance(parent, dict):
        details = parent.get("subscription_details")
        if isinstance(details, dict) and _id(details.get("subscription")):
            return _id(details.get("subscription"))
    return _id(obj.get("subscription"))
