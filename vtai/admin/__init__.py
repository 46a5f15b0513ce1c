"""The /admin dashboard and provider balances."""
