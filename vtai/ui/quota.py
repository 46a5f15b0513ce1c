"""How a user's quota reads in the chat and in `vtai usage`: used / limit, left, reset, and
every other cap of their plan; and how a refusal for quota reads."""

from __future__ import annotations

from datetime import datetime

from vtai.metering.gate import Usage


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


def describe_usage(usage: Usage, weight: float | None = None) -> str:
    """The quota line with every cap that applies: tokens this period, today, dollars, and the
    current model's weight when it is not 1."""
    parts = [describe(usage.tier, usage.used, usage.token_limit, usage.resets_at)]
    note = topup_note(usage)
    if note:
        parts.append(note)
    if usage.daily_limit is not None:
        left = max(usage.daily_limit - usage.daily_used, 0)
        parts.append(f"today {usage.daily_used:,} / {usage.daily_limit:,} ({left:,} left)")
    if usage.usd_limit is not None:
        parts.append(f"${usage.usd_used:,.2f} / ${usage.usd_limit:,.2f} spent")
    line = " · ".join(parts)
    note = weight_note(weight)
    return f"{line} · {note}" if note else line


def topup_note(usage: Usage) -> str | None:
    """Tokens bought on top of the tier's limit and left this period: "+ 50,000 top-up until
    2026-12-31" (the earliest expiry). getattr: the gate's Usage gains these with top-ups."""
    left = getattr(usage, "topup_left", 0) or 0
    if left <= 0:
        return None
    until = getattr(usage, "topup_until", None)
    return f"+ {left:,} top-up" + (f" until {until:%Y-%m-%d}" if until else "")


def weight_note(weight: float | None) -> str | None:
    if weight is None or weight == 1:
        return None
    if weight == 0:
        return "this model is free: it doesn't count against your quota"
    return f"this model counts {weight:g}× against your quota"


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
