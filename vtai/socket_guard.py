"""What a chat client may send over socket.io: checked before Chainlit acts on it.

(Being written for issue #15.)
"""

from __future__ import annotations


def install(sio, settings) -> None:
    """Called once from vtai/main.py with Chainlit's socket.io server."""
