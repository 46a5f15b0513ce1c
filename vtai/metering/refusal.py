"""The words of a refused turn: which rule of the plan refused it, and when it resets.

The rules themselves are vtai_reserve()'s (supabase/migrations/functions/20_metering.sql);
this module only says what its `reason` means. What the user can do next (a free model, a
shorter chat) is offered by the chat (vtai.ui.chat)."""

from __future__ import annotations

from datetime import datetime

from vtai.metering.gate import Grant

# Below this many tokens of room for the answer, a turn is not worth starting.
MIN_COMPLETION = 16


def when(at: datetime | None) -> str:
    return at.strftime("%Y-%m-%d %H:%M UTC") if at else "never (lifetime quota)"


def refusal(grant: Grant, period: str, model: str, message_tokens: int | None = None) -> str:
    """Why a turn was refused, in one line: which rule, and when it resets. `message_tokens`:
    the new message alone, as reserved, for a prompt that did not fit what is left."""
    if grant.reason == "unavailable":
        return "The usage service is unavailable, so no answer was sent: try again shortly."
    if grant.reason == "error":
        return (
            "Your quota could not be checked because of an error on the server, so no answer "
            "was sent: try again, and tell the administrator if it keeps happening."
        )
    if grant.reason == "unknown_user":
        return "Your account no longer exists: sign in again or ask the administrator."
    if grant.reason == "short_answer_only":
        return short_answer(grant, period)
    plan = f"the {grant.tier} plan" if grant.tier else "your plan"
    reason = grant.reason
    if reason == "model_not_allowed":
        return f"{plan.capitalize()} doesn't include {model}: pick another model in the settings."
    if reason == "price_unknown":
        return (
            f"{model} has no known price, so it can't be used under {plan}'s dollar cap: pick "
            "another model, or ask the administrator to give it a price."
        )
    if reason == "rate_limited":
        at = grant.resets_at.strftime("%H:%M:%S UTC") if grant.resets_at else "in a minute"
        return (
            f"That is {grant.rpm} requests this minute, the most {plan} allows: try again at {at}."
        )
    if reason in ("daily_exhausted", "prompt_exceeds_daily"):
        quota = "today's token quota"
        used = f"{grant.daily_used:,} of {grant.daily_limit or 0:,} tokens used today"
    elif reason in ("usd_exhausted", "prompt_exceeds_usd"):
        quota = "your dollar quota"
        used = f"${grant.usd_used:,.2f} of ${grant.usd_limit or 0:,.2f} spent this {period}"
    else:
        limit = f"{grant.token_limit:,}" if grant.token_limit is not None else "unlimited"
        quota = "your token quota"
        used = f"{grant.used + grant.reserved:,} of {limit} tokens used this {period}"
    room = grant.room
    if not reason.startswith("prompt_exceeds"):
        head = f"You have used {quota}"
    elif (
        message_tokens is not None and room is not None and room >= message_tokens + MIN_COMPLETION
    ):
        head = (
            f"This conversation is too long for the {room:,} tokens left in {quota}: "
            "start a new chat to go on"
        )
    elif room is not None and message_tokens is not None:
        head = (
            f"Your message is larger than what is left of {quota} (about {message_tokens:,} "
            f"tokens with its answer's minimum; {room:,} left): shorten it"
        )
    else:
        head = f"This message and its answer would cross {quota}"
    return (
        f"{head}. {used} on the {grant.tier} tier; it resets {when(grant.resets_at)}. For more, "
        "ask the administrator to move you to a higher tier."
    )


def short_answer(grant: Grant, period: str) -> str:
    """A grant whose answer a cap clamped to a few tokens: say so before spending them."""
    limit = f"{grant.token_limit:,}" if grant.token_limit is not None else "unlimited"
    return (
        f"Only about {grant.max_tokens:,} tokens of answer are left within your quota: enough "
        f"for a short answer. {grant.used:,} of {limit} tokens used this {period} on the "
        f"{grant.tier} tier; your token quota resets {when(grant.resets_at)}."
    )
