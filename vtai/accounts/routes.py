"""HTTP routes of vtai.accounts (being built)."""


def register(app) -> None:
    """Add this package's routes to Chainlit's FastAPI app, ahead of its catch-all page."""
