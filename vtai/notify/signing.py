"""The body and `VTAI-Signature` header of a webhook delivery (docs/operations.md, "Webhooks").

`VTAI-Signature: t=<unix time>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`: the time is signed
with the body, so a receiver that checks it is recent refuses a captured delivery replayed later.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time

HEADER = "VTAI-Signature"


def body(event: dict) -> bytes:
    """The exact bytes sent (and signed): compact JSON, UTF-8."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def signature(secret: str, payload: bytes, at: int | None = None) -> str:
    t = int(time.time()) if at is None else at
    mac = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def headers(secret: str, event: dict, payload: bytes) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        HEADER: signature(secret, payload),
        "VTAI-Event-Id": str(event["id"]),
        "VTAI-Event-Type": str(event["type"]),
        "User-Agent": "vtai-webhooks/1",
    }
