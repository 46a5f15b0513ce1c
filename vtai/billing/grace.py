"""The end of a grace period: a user whose payment first failed more than
VTAI_BILLING_GRACE_DAYS ago goes down to what their subscriptions still give (usually free),
without waiting for Stripe's next event. `vtai_billing_sweep()` (functions/50_billing.sql) does
it; this module calls it now and then.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime

log = logging.getLogger(__name__)


Moved = list[tuple[uuid.UUID, str, str]]


async def sweep(services, settings, now: datetime | None = None) -> Moved:
    """(user, old tier, new tier) of each user moved now; nothing when billing is off."""
    if not settings.billing:
        return []
    now = now or datetime.now(UTC)
    grace = settings.billing_grace_days
    if services.db is not None:
        async with services.db.pool.acquire() as conn:
            rows = await conn.fetch("select * from public.vtai_billing_sweep($1, $2)", now, grace)
        moved = [(r["user_id"], r["old_tier"], r["new_tier"]) for r in rows]
    elif services.store is not None:
        rows = await services.store._rpc(
            "vtai_billing_sweep", {"p_now": now.isoformat(), "p_grace_days": grace}
        )
        moved = [(uuid.UUID(r["user_id"]), r["old_tier"], r["new_tier"]) for r in rows or []]
    else:
        return []
    for user, old, new in moved:
        log.info("billing grace period over for user %s: tier %s -> %s", user, old, new)
    return moved


async def sweep_forever(services, settings, every: float = 600) -> None:
    """sweep() every `every` seconds until cancelled; a failed sweep is logged and retried at
    the next one (a grace period ends at most `every` seconds late)."""
    if not settings.billing:
        return
    while True:
        try:
            await sweep(services, settings)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning(
                "billing grace sweep failed (%s: %s); next try in %ss",
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
                every,
            )
        await asyncio.sleep(every)
