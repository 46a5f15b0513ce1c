"""The one Stripe client: the official library, pinned to one API version, async calls only.

Pinned because the shapes VT.ai reads change between versions: since 2025-03-31 ("basil") a
subscription's current_period_start/end live on its items, not on the subscription.
"""

from __future__ import annotations

import stripe

from vtai.settings import Settings

# The version every request asks for, and whose event shapes webhook.py reads.
API_VERSION = "2025-03-31.basil"


def make_client(settings: Settings) -> stripe.StripeClient | None:
    """A client for the configured account; None when billing is off (no STRIPE_SECRET_KEY).

    VTAI_STRIPE_API_BASE points it at another server (localstripe in tests). The HTTP client is
    httpx's, so `*_async` calls never block the event loop.
    """
    if settings.stripe_secret_key is None:
        return None
    base = settings.stripe_api_base
    return stripe.StripeClient(
        settings.stripe_secret_key.get_secret_value(),
        stripe_version=API_VERSION,
        base_addresses={"api": base} if base else None,
        http_client=stripe.HTTPXClient(),
        max_network_retries=2,
    )
