"""Selling the tiers with Stripe (docs/billing.md): checkout and the customer portal
(checkout.py), the webhook that moves tiers and adds top-up grants (webhook.py), and the one
Stripe client they share (client.py). Off, and hidden, without STRIPE_SECRET_KEY."""
