"""A one-line JSON refusal sent straight from ASGI middleware, before any route runs."""

from __future__ import annotations

import json


async def refuse(send, status: int, detail: str, extra_headers: tuple = ()) -> None:
    """Answer `{"detail": detail}` with `status`; the middleware then returns."""
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *extra_headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
