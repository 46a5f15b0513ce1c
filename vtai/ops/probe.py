"""`vtai doctor`'s probe: one real metered turn on the local model, by a user kept for it.

The turn takes the chat's whole path (vtai.metering.turn: gate, reservation, LiteLLM, the
metering callback, the batched ledger) and must land in `request_logs` as the callback's row,
with its reservation settled and the counters still equal to the ledger. Its rows say
`source = 'probe'` and belong to PROBE_USER_ID, so /admin leaves them out (the ledger's by
source, the aggregates' by user) while the counters and aggregates keep counting them.

The probe user is made on first use: tier unlimited (the probe never fails on a quota), no
password and disabled, so nobody logs in as it. It has a fixed id rather than a name to look
up: a person who signed up as `vtai-probe` first is never mistaken for it.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from vtai.llm.models import LOCAL_MODEL_ID
from vtai.metering.turn import TurnRequest
from vtai.ops.health import Check, fail, ok, skip
from vtai.settings import NEEDS_DATABASE

PROBE_USER_ID = uuid.UUID("00000000-0000-4000-8000-7674616970f0")
PROBE_USERNAME = "vtai-probe"
PROBE_TIER = "unlimited"
SOURCE = "probe"
# The whole turn, settling included: the local model answers 8 tokens in well under a second.
TIMEOUT = 30.0
_TEXT = "Reply with one word: ok."
_MAX_TOKENS = 4


class ProbeError(Exception):
    """The probe user can't be made or used; str() says what to do."""


async def ensure_user(pool) -> uuid.UUID:
    """The probe user, made on first use and put back to unlimited and disabled if changed."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "insert into public.profiles (id, username, tier, disabled_at)"
            " values ($1, $2, $3, now()) on conflict do nothing",
            PROBE_USER_ID,
            PROBE_USERNAME,
            PROBE_TIER,
        )
        row = await conn.fetchrow(
            "update public.profiles set tier = $2, disabled_at = coalesce(disabled_at, now())"
            " where id = $1 returning username",
            PROBE_USER_ID,
            PROBE_TIER,
        )
        if row is None:
            raise ProbeError(
                f"another user is named {PROBE_USERNAME!r}, which the probe user needs:"
                f" rename or delete that user"
            )
        # A password someone set by hand (`vtai user password`) would be a way in.
        await conn.execute(
            "delete from vtai_private.credentials where profile_id = $1", PROBE_USER_ID
        )
    return PROBE_USER_ID


async def _ignore(_text: str) -> None:
    return None


async def run(services, timeout: float = TIMEOUT) -> Check:
    """One probe turn, and whether it landed in the ledger and settled."""
    if services.db is None:
        return skip(f"the probe turn {NEEDS_DATABASE}")
    if LOCAL_MODEL_ID not in services.runner.offered():
        return skip(
            f"{LOCAL_MODEL_ID} is not offered here: `vtai model enable {LOCAL_MODEL_ID}` to probe"
        )
    pool = services.db.pool
    try:
        user_id = await ensure_user(pool)
    except ProbeError as exc:
        return fail(str(exc))
    req = TurnRequest(
        user_id=user_id,
        session_id="vtai-doctor",
        model=LOCAL_MODEL_ID,
        history=[],
        text=_TEXT,
        source=SOURCE,
        max_tokens=_MAX_TOKENS,
    )
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            outcome = await services.runner.run(req, _ignore)
            if outcome.kind != "answered":
                return fail(
                    f"the turn was {outcome.kind} ({outcome.reason or outcome.notice}):"
                    " the chat would fail the same way; see the app's log"
                )
            await asyncio.shield(outcome.settled)
    except TimeoutError:
        return fail(
            f"no settled row in {timeout:g} s: the metering callback did not record the turn"
            " (is the ledger's database slow? see the app's log)"
        )
    row = await pool.fetchrow(
        "select status, source, total_tokens,"
        " coalesce((additional_details ->> 'provisional')::boolean, false) as provisional"
        " from public.request_logs where litellm_call_id = $1",
        outcome.call_id,
    )
    if row is None:
        return fail(
            "the turn answered but its row is not in request_logs: it went to the spool"
            " (vtai spool status; the database refused it, see the app's log)"
        )
    if row["provisional"]:
        return fail(
            "the row is the turn's held copy, not the metering callback's: the callback did"
            " not run (vtai.services.register_callback)"
        )
    if row["status"] != "success" or row["source"] != SOURCE or not row["total_tokens"]:
        return fail(f"the row is wrong: {dict(row)}")
    reservation = outcome.grant.reservation_id if outcome.grant is not None else None
    held = await pool.fetchval(
        "select count(*) from public.reservations where id = $1", reservation
    )
    if held:
        return fail(
            "the row landed but its reservation is still held: vtai_record_batch did not settle it"
        )
    mismatched = await pool.fetchval("select count(*) from public.vtai_verify_counters()")
    if mismatched:
        return fail(
            f"{mismatched} usage counter(s) differ from the ledger: see `vtai usage --verify`"
        )
    took = time.monotonic() - started
    return ok(
        f"{row['total_tokens']} tokens on {LOCAL_MODEL_ID} recorded by the metering callback"
        f" and settled in {took:.1f} s; counters equal the ledger"
    )
