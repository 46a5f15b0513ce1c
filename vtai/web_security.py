"""Same-origin only: CORS, socket.io origins, and the security headers on every response.

(Being written for issue #15, item 3.)
"""

from __future__ import annotations


def install(app, sio, settings) -> None:
    """Called once from vtai/main.py with Chainlit's FastAPI app and socket.io server."""
