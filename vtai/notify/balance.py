"""`balance.low`: a provider's balance under VTAI_WEBHOOK_BALANCE_BELOW (US dollars), written
with the synced balance (vtai.admin.balances), once per provider per UTC day while it stays
under (public.vtai_balance_low)."""

from __future__ import annotations

import logging

from vtai.settings import load_settings

log = logging.getLogger(__name__)


async def check(conn, fetched) -> int:
    """Inside the transaction that stores the balances: how many events were written."""
    below = load_settings().webhook_balance_below
    if below is None:
        return 0
    written = 0
    for f in fetched:
        if f.error is None and f.balance is not None and (f.currency or "USD") == "USD":
            found = await conn.fetchval(
                "select public.vtai_balance_low($1, $2, $3, $4)",
                f.provider,
                f.balance,
                f.currency,
                below,
            )
            written += found is not None
    return written
