"""What of a conversation's text is kept in request_logs (VTAI_LOG_CONTENT)."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def _redact(text: str) -> dict:
    return {
        "redacted": True,
        "length": len(text),
        "sha256": hashlib.sha256(text.encode("utf-8", "replace")).hexdigest(),
    }


def content_for_log(value: Any, mode: str) -> Any:
    """`full` keeps the text, `none` keeps nothing, `redacted` keeps length and hash only."""
    if value is None or mode == "full":
        return value
    if mode == "none":
        return None
    if isinstance(value, str):
        return _redact(value)
    if isinstance(value, list):
        return [
            {"role": m.get("role"), "content": _redact(json.dumps(m.get("content"), default=str))}
            if isinstance(m, dict)
            else _redact(str(m))
            for m in value
        ]
    return _redact(json.dumps(value, default=str))
