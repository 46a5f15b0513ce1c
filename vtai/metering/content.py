"""What of a conversation's text is kept in request_logs (VTAI_LOG_CONTENT)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

_SECRET_NAME = re.compile(r"(KEY|SECRET|PASSWORD|TOKEN)$")
# Provider keys that providers echo back in error text, whoever's they are.
_KEY_SHAPES = re.compile(r"\b(sk|pk|rk|sb|sbp)[-_][A-Za-z0-9_\-*]{6,}")


def redact_secrets(text: str, env: dict[str, str] | None = None) -> str:
    """Remove configured secrets and anything shaped like an API key from `text`."""
    env = os.environ if env is None else env
    for name, value in env.items():
        if _SECRET_NAME.search(name) and len(value) >= 8:
            text = text.replace(value, "[redacted]")
    return _KEY_SHAPES.sub("[redacted key]", text)


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
