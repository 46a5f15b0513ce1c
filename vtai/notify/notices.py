"""Quota notices: "you have used 80% of ..." once per threshold, cap and period.

After a turn's row is settled (never on the gate's path), public.vtai_notices() reads the
user's counters, records each newly crossed threshold (VTAI_WARN_AT) with its `quota.threshold`
webhook event in one transaction, and answers them; the chat shows one line each, the API a
header. Told once per (user, cap, threshold, period) in the database, so a new chat, a reload or
another process never repeats one. A refusal at a cap is reported to the operator once per
user, cap and period the same way (public.vtai_quota_refused), in the background.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime

from vtai.metering.gate import QUOTA_REASONS
from vtai.notify import delivery, outbox

log = logging.getLogger(__name__)

# How long a notice waits for the turn's row to be settled (as the quota line does).
SETTLE_WAIT = 10.0

_background: set[asyncio.Task] = set()


@dataclass(frozen=True)
class Notice:
    cap: str  # tokens | daily | usd
    threshold: int
    used: float
    limit: float
    resets_at: datetime | None

    def line(self, period: str) -> str:
        """One line for the chat."""
        share = "all" if self.threshold >= 100 else f"{self.threshold}%"
        when = f"; it resets {self.resets_at:%Y-%m-%d %H:%M} UTC" if self.resets_at else ""
        if self.cap == "usd":
            amounts = f"${self.used:,.2f} of ${self.limit:,.2f}"
            return f"You have used {share} of your dollars this {period} ({amounts}){when}."
        amounts = f"{int(self.used):,} of {int(self.limit):,} tokens"
        what = "today's tokens" if self.cap == "daily" else f"your tokens this {period}"
        return f"You have used {share} of {what} ({amounts}){when}."

    def short(self) -> str:
        """For a header: `tokens 80%`."""
        return f"{self.cap} {self.threshold}%"


def header(notices: list[Notice]) -> str | None:
    """The x-vtai-quota-warning value: `tokens 80%, daily 100%`."""
    return ", ".join(n.short() for n in notices) or None


def might_cross(grant, thresholds: tuple[int, ...]) -> bool:
    """Whether the turn this grant reserved for could have crossed a threshold: False only when
    even its whole reservation, on top of everything reserved with it, stays under the lowest
    one of every cap, so most API turns skip the wait for their row. A dollar cap always may."""
    if not thresholds or grant is None or not grant.tier or not grant.granted:
        return False
    if grant.usd_limit is not None:
        return True
    low = min(thresholds)
    at_most = grant.used + grant.reserved
    if grant.token_limit is not None and at_most * 100 >= low * grant.token_limit:
        return True
    daily_most = grant.daily_used + grant.reserved
    return grant.daily_limit is not None and daily_most * 100 >= low * grant.daily_limit


async def after_turn(services, user_id: uuid.UUID, outcome) -> list[Notice]:
    """The notices this turn's row brought (none if it did not settle in SETTLE_WAIT)."""
    thresholds = services.settings.warn_at
    grant = outcome.grant
    if not thresholds or outcome.settled is None or grant is None or not grant.tier:
        return []
    try:
        await asyncio.wait_for(asyncio.shield(outcome.settled), SETTLE_WAIT)
        rows = await outbox.calls_for(services).rows(
            "vtai_notices",
            p_user=user_id,
            p_period=services.settings.usage_period,
            p_thresholds=list(thresholds),
        )
    except Exception as exc:
        # Late, spooled or unreadable: told after a later turn instead (they wait in SQL).
        log.warning("quota notices skipped (%s)", type(exc).__name__)
        return []
    if rows:
        delivery.poke()
    return [
        Notice(r["cap"], r["threshold"], float(r["used"]), float(r["cap_limit"]), r["resets_at"])
        for r in rows
    ]


async def after_api_turn(services, req, outcome) -> list[Notice]:
    """after_turn() for an API request: skipped, with no wait for the row, when the turn could
    not have crossed a threshold (most turns), so a response waits only when it might tell."""
    if outcome.kind != "answered" or not might_cross(outcome.grant, services.settings.warn_at):
        return []
    return await after_turn(services, req.user_id, outcome)


def refused(services, user_id: uuid.UUID, grant) -> None:
    """A turn refused at a cap: the operator's `quota.refused`, once per user, cap and period,
    written in the background (webhooks off: nothing to write)."""
    if not services.settings.webhook_urls or grant is None or grant.reason not in QUOTA_REASONS:
        return

    async def write() -> None:
        try:
            new = await outbox.scalar(
                outbox.calls_for(services),
                "vtai_quota_refused",
                p_user=user_id,
                p_period=services.settings.usage_period,
                p_reason=grant.reason,
            )
        except Exception as exc:
            log.warning("quota.refused event not written (%s)", type(exc).__name__)
            return
        if new:
            delivery.poke()

    task = asyncio.ensure_future(write())
    _background.add(task)
    task.add_done_callback(_background.discard)
