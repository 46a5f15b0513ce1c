"""Logins the server can end: each login is a row, and every request and socket event checks it.

(Being written for issue #15, items 4 and 10.)
"""

from __future__ import annotations


def install(app, sio, settings) -> None:
    """Called once from vtai/main.py with Chainlit's FastAPI app and socket.io server."""
