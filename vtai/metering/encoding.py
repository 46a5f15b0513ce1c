"""A ledger row as Postgres can store it: characters it rejects replaced, JSON encoded once.

The journal, the spool and the database all take the same text, so a row is encoded once.
"""

from __future__ import annotations

import json
import re
from typing import Any

# Postgres text and jsonb reject NUL, and JSON can't carry lone surrogates as UTF-8.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def sanitize(value: Any) -> Any:
    """Replace characters Postgres can't store with U+FFFD, recursively."""
    if isinstance(value, dict | list):
        return encode(value)[0]
    return _replace_unstorable(value)


def encode(row: Any) -> tuple[Any, str]:
    """The storable row and its JSON text, encoded once for the journal and the database."""
    try:
        text = json.dumps(row, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = None
    # The C encoder writes NUL as \u0000 and leaves lone surrogates as they are, so one look
    # at the text replaces a Python walk of every string; a false alarm only costs the walk.
    if text is None or "\\u0000" in text or _SURROGATE.search(text):
        row = _replace_unstorable(row)
        text = json.dumps(row, ensure_ascii=False, default=str)
    return row, text


def _replace_unstorable(value: Any) -> Any:
    if isinstance(value, str):
        return _UNSTORABLE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_replace_unstorable(str(k)): _replace_unstorable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_replace_unstorable(v) for v in value]
    return value
