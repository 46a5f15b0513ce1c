"""How a user's quota reads in the chat and in `vtai usage`: used / limit, left, reset."""

from __future__ import annotations

from datetime import datetime


def _when(at: datetime | None) -> str:
    return at.strftime("%Y-%m-%d %H:%M UTC") if at else "never (lifetime quota)"


def describe(tier: str, used: int, limit: int | None, resets_at: datetime | None) -> str:
    if limit is None:
        return f"{used:,} tokens used this period · {tier} tier (no limit)"
    left = max(limit - used, 0)
    return (
        f"{bar(used, limit, 10)} {used:,} / {limit:,} tokens used · {left:,} left · "
        f"{tier} tier · resets {_when(resets_at)}"
    )


def bar(used: int, limit: int | None, width: int = 20) -> str:
    if not limit:
        return ""
    filled = min(width, round(width * used / limit))
    return "█" * filled + "░" * (width - filled)


def daily_chart(days: list[tuple[datetime, int]], width: int = 24) -> str:
    """A small per-day bar chart, one line a day, for a monospace block."""
    if not days:
        return "no usage yet this period"
    top = max(tokens for _, tokens in days) or 1
    return "\n".join(
        f"{day:%b %d}  {'█' * max(1, round(width * tokens / top)) if tokens else ''} {tokens:,}"
        for day, tokens in days
    )
