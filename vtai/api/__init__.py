"""The OpenAI-compatible endpoint `/v1` and what it stands on: personal API keys (keys), the
/account page where a user manages theirs (account)."""
