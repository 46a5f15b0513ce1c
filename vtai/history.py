"""Chat history: Chainlit's data layer on VT.ai's own database (VTAI_HISTORY=on|off).

Placeholder until the history work lands: persistence stays off.
"""

from __future__ import annotations


def enabled() -> bool:
    return False


def data_layer(services):
    return None


def messages_from_thread(thread: dict) -> list[dict]:
    """The model's message history rebuilt from a stored thread's steps."""
    return []
