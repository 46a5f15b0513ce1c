"""Model patterns, shell-style, read exactly as vtai_glob_like() reads them in SQL: `*` matches
any characters (`/` included), `?` one character, everything else itself. A tier's models and
the weight rules are patterns; the database applies them, and the app uses this to show what
the database will allow (the picker, a free model to offer)."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable


@functools.lru_cache(maxsize=1024)
def _regex(pattern: str) -> re.Pattern[str]:
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile("".join(parts), re.DOTALL)


def matches(pattern: str, name: str) -> bool:
    return _regex(pattern).fullmatch(name) is not None


def allowed(patterns: Iterable[str], names: Iterable[str]) -> list[str]:
    """`names` (in their order) that any of `patterns` matches."""
    patterns = tuple(patterns)
    return [n for n in names if any(matches(p, n) for p in patterns)]
