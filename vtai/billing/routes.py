"""The billing routes: Stripe's webhook (webhook.py) and the user's way to pay (checkout.py)."""

from vtai.billing import checkout, webhook


def register(app) -> None:
    """Add /billing/* to Chainlit's FastAPI app, ahead of its catch-all page route."""
    webhook.register(app)
    checkout.register(app)
