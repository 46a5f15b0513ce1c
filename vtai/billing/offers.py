"""The plans on sale: each Price of VTAI_STRIPE_PRICES with what it buys (its tier's caps from
the `tiers` table, or a top-up pack's tokens) and what it costs (amount, currency and interval,
from Stripe).

The chat's *Upgrade* actions and the /account page show these before the user chooses. Tiers
are read on every call (an admin's edit shows at once; one small query); Stripe's prices are
cached for PRICE_TTL seconds, since they change rarely and a refusal should not wait on Stripe.
A price Stripe can't give is offered without its amount (Checkout shows it) and asked again
after FAILED_TTL seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import asyncpg

from vtai.settings import Settings

log = logging.getLogger(__name__)

PRICE_TTL = 300.0
FAILED_TTL = 30.0
# ISO 4217 currencies without minor units: Stripe's amounts for them are whole units.
ZERO_DECIMAL = frozenset("bif clp djf gnf jpy kmf krw mga pyg rwf ugx vnd vuv xaf xof xpf".split())
SYMBOLS = {"usd": "$", "eur": "€", "gbp": "£"}


@dataclass(frozen=True)
class Price:
    """What Stripe says a Price costs; amount in the currency's minor units."""

    amount: int | None
    currency: str | None
    interval: str | None = None
    interval_count: int = 1


@dataclass(frozen=True)
class Offer:
    price_id: str
    # a tier's Price (a subscription) or a top-up pack (one payment)
    tier: str | None
    topup_tokens: int | None
    rank: int = 0
    token_limit: int | None = None
    daily_limit: int | None = None
    usd_limit: float | None = None
    amount: int | None = None
    currency: str | None = None
    interval: str | None = None
    interval_count: int = 1

    @property
    def kind(self) -> str:
        return "topup" if self.topup_tokens is not None else "tier"

    @property
    def mode(self) -> str:
        """The Checkout mode that buys it."""
        return "payment" if self.kind == "topup" else "subscription"

    def name(self) -> str:
        return "Top-up" if self.kind == "topup" else (self.tier or "").capitalize()

    def limits(self, period: str) -> str:
        """What it buys, in words: "500,000 tokens/month", "50,000 tokens"."""
        if self.kind == "topup":
            return f"{self.topup_tokens:,} tokens"
        if self.token_limit is None:
            words = "unlimited tokens"
        else:
            words = f"{self.token_limit:,} tokens{_per(period, self.interval)}"
        if self.daily_limit is not None:
            words += f" (at most {self.daily_limit:,} a day)"
        if self.usd_limit is not None:
            words += f" (up to ${self.usd_limit:,.2f} of model cost)"
        return words

    def cost(self) -> str | None:
        """ "$20.00/month", "$5.00"; None when Stripe did not say."""
        if self.amount is None or not self.currency:
            return None
        money = format_money(self.amount, self.currency)
        if self.interval is None:
            return money
        every = (
            self.interval
            if self.interval_count == 1
            else (f"{self.interval_count} {self.interval}s")
        )
        return f"{money}/{every}"

    def label(self, period: str) -> str:
        """One line for a button: "Premium — 500,000 tokens/month — $20.00/month"."""
        parts = [self.name(), self.limits(period)]
        cost = self.cost()
        if cost:
            parts.append(cost)
        return " — ".join(parts)

    def as_dict(self, period: str) -> dict[str, Any]:
        return asdict(self) | {
            "kind": self.kind,
            "label": self.label(period),
            "limits": self.limits(period),
            "cost": self.cost(),
        }


def _per(period: str, interval: str | None) -> str:
    if period == "lifetime":
        return ""
    if period == "billing":
        # The period follows the subscription: its interval is the price's.
        return f"/{interval}" if interval else " per billing period"
    return f"/{period}"


def format_money(amount: int, currency: str) -> str:
    code = currency.lower()
    value = amount if code in ZERO_DECIMAL else amount / 100
    number = f"{value:,.0f}" if code in ZERO_DECIMAL else f"{value:,.2f}"
    symbol = SYMBOLS.get(code)
    return f"{symbol}{number}" if symbol else f"{number} {code.upper()}"


def price_of(obj: Any) -> Price:
    """A Stripe Price object (or its dict) as a Price."""
    recurring = field(obj, "recurring")
    amount = field(obj, "unit_amount")
    return Price(
        amount=int(amount) if amount is not None else None,
        currency=field(obj, "currency"),
        interval=field(recurring, "interval"),
        interval_count=int(field(recurring, "interval_count") or 1),
    )


def field(obj: Any, key: str) -> Any:
    """obj[key] of a StripeObject (not a dict: no .get) or a dict; None when absent."""
    if obj is None:
        return None
    try:
        return obj[key]
    except (KeyError, TypeError):
        return None


class PriceCache:
    """Stripe's prices, each kept PRICE_TTL seconds (a failure FAILED_TTL); one fetch at a time
    per price, so a burst of refusals asks Stripe once."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._entries: dict[str, tuple[float, Price | None]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def clear(self) -> None:
        self._entries.clear()

    async def get(self, client, price_id: str) -> Price | None:
        entry = self._entries.get(price_id)
        if entry and entry[0] > self._clock():
            return entry[1]
        lock = self._locks.setdefault(price_id, asyncio.Lock())
        async with lock:
            entry = self._entries.get(price_id)
            if entry and entry[0] > self._clock():
                return entry[1]
            try:
                price = price_of(await client.v1.prices.retrieve_async(price_id))
                ttl = PRICE_TTL
            except Exception as exc:
                # The class only: a Stripe error's text may quote the request.
                log.warning(
                    "Stripe price %s unreadable (%s); offered without its amount",
                    price_id,
                    type(exc).__name__,
                )
                price, ttl = None, FAILED_TTL
            self._entries[price_id] = (self._clock() + ttl, price)
            return price


_prices = PriceCache()


async def offers(
    pool: asyncpg.Pool | asyncpg.Connection,
    settings: Settings,
    client,
    cache: PriceCache | None = None,
) -> list[Offer]:
    """Every Price on sale, tiers by rank then top-ups by size. A Price whose tier is not in
    the `tiers` table is left out (and logged): it could not be honoured."""
    prices = settings.stripe_prices
    if not prices or client is None:
        return []
    cache = cache or _prices
    rows = await pool.fetch(
        "select name, rank, token_limit, daily_limit, usd_limit from public.tiers"
        " where name = any($1::text[])",
        [t for t in prices.values() if isinstance(t, str)],
    )
    tiers = {r["name"]: r for r in rows}
    fetched = await asyncio.gather(*(cache.get(client, pid) for pid in prices))
    found: list[Offer] = []
    for (price_id, target), price in zip(prices.items(), fetched, strict=True):
        cost = asdict(price) if price else {}
        if isinstance(target, str):
            tier = tiers.get(target)
            if tier is None:
                log.warning(
                    "VTAI_STRIPE_PRICES: %s sells tier %r, which does not exist", price_id, target
                )
                continue
            usd = tier["usd_limit"]
            found.append(
                Offer(
                    price_id,
                    target,
                    None,
                    rank=tier["rank"],
                    token_limit=tier["token_limit"],
                    daily_limit=tier["daily_limit"],
                    usd_limit=float(usd) if usd is not None else None,
                    **cost,
                )
            )
        else:
            found.append(Offer(price_id, None, int(target["topup_tokens"]), **cost))
    return sorted(
        found,
        key=lambda o: (o.kind == "topup", o.rank, o.topup_tokens or 0, o.amount or 0),
    )


def upgrades(all_offers: list[Offer], current_rank: int | None) -> list[Offer]:
    """What a user on a tier of `current_rank` may buy: higher tiers, and every top-up."""
    return [
        o for o in all_offers if o.kind == "topup" or current_rank is None or o.rank > current_rank
    ]
