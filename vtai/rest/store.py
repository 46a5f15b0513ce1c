"""Metering through the Supabase REST API, for deployments with a service key but no DB URL.

The same SQL functions as the direct path (vtai_reserve, vtai_record, vtai_usage) are called
over PostgREST RPC with the async client, so no request blocks the event loop. The direct
connection stays preferred (one round trip, no REST hop); see docs/supabase.md.

The key must be the service_role key: the migrations revoke these functions from anon and
authenticated, so the public anon key gets "permission denied" by design.

In REST mode this object is both the gate (reserve, usage, daily) and the ledger's store
(record_batch, is_unavailable, is_bad_data), and it reads and creates the profiles of
Supabase Auth users.
"""

from __future__ import annotations

import json
import logging
import uuid
from datetime import datetime
from typing import Any

import httpx
from postgrest.exceptions import APIError

from supabase import AsyncClient, AsyncClientOptions, acreate_client
from vtai.db.accounts import Profile
from vtai.metering.encoding import sanitize
from vtai.metering.gate import Grant, Usage, grant_of, usage_of, when_unavailable

log = logging.getLogger(__name__)

# Network failures and gateway/server errors: the usage service is down, not the request bad.
UNAVAILABLE = (httpx.TransportError, OSError, TimeoutError)


def is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, UNAVAILABLE):
        return True
    # APIError carries PostgREST's code: a SQLSTATE, or PGRSTxxx, or an HTTP status when the
    # body wasn't PostgREST's JSON (a gateway's 502/503/504).
    return isinstance(exc, APIError) and str(exc.code or "").startswith(("5", "08", "57P"))


def is_bad_data(exc: BaseException) -> bool:
    """True when the database rejected the row itself; retrying would fail the same way."""
    code = str(getattr(exc, "code", "") or "")
    return isinstance(exc, APIError) and code.startswith(("22", "23"))


def _datetime(value):
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def _json(value: Any) -> Any:
    # Through json so datetimes and uuids travel as the SQL functions parse them.
    return json.loads(json.dumps(sanitize(value), default=str))


def _profile(row: dict) -> Profile:
    return Profile(uuid.UUID(row["id"]), row["username"], row["tier"], row["is_admin"])


PROFILE_COLUMNS = "id,username,tier,is_admin"
# PostgREST caps a response (Supabase's default max-rows is 1000); pages stay below it.
PAGE_ROWS = 500


class SupabaseStore:
    """reserve / record / usage over RPC, mirroring vtai.metering.gate.Gate and
    vtai.metering.ledger.Ledger."""

    def __init__(
        self,
        client: AsyncClient,
        period: str = "month",
        ttl_seconds: int = 900,
        fail_mode: str = "closed",
    ):
        self.client = client
        self.period = period
        self.ttl_seconds = ttl_seconds
        self.fail_mode = fail_mode

    @classmethod
    async def connect(
        cls,
        url: str,
        service_key: str,
        period: str = "month",
        ttl_seconds: int = 900,
        fail_mode: str = "closed",
        timeout: float = 5.0,
    ) -> SupabaseStore:
        options = AsyncClientOptions(
            httpx_client=httpx.AsyncClient(timeout=timeout),
            # A reserve must never be sent twice; the caller's fail mode decides instead.
            postgrest_client_retry=False,
            auto_refresh_token=False,
            persist_session=False,
        )
        client = await acreate_client(url, service_key, options=options)
        return cls(client, period, ttl_seconds, fail_mode)

    async def close(self) -> None:
        await self.client.postgrest.aclose()
        if self.client.options.httpx_client is not None:
            await self.client.options.httpx_client.aclose()

    async def _rpc(self, fn: str, params: dict):
        # The reference design's bug was a sync execute() inside async code; this one awaits.
        return (await self.client.rpc(fn, params).execute()).data

    async def reserve(
        self,
        user_id: uuid.UUID,
        prompt_tokens: int,
        max_completion: int,
        now: datetime | None = None,
        *,
        model: str | None = None,
        prices: tuple[float, float] | None = None,
        ahead: bool = False,
        min_completion: int = 1,
    ) -> Grant:
        price_in, price_out = prices if prices is not None else (None, None)
        params = {
            "p_user": str(user_id),
            "p_prompt_tokens": prompt_tokens,
            "p_max_completion": max_completion,
            "p_period": self.period,
            "p_ttl_seconds": self.ttl_seconds,
            "p_model": model,
            "p_price_in": price_in,
            "p_price_out": price_out,
            "p_ahead": ahead,
            "p_min_completion": min_completion,
        }
        if now is not None:
            params["p_now"] = now.isoformat()
        try:
            rows = await self._rpc("vtai_reserve", params)
            row = dict(rows[0])
            if row.get("reservation_id"):
                row["reservation_id"] = uuid.UUID(row["reservation_id"])
            for key in ("period_start", "resets_at"):
                row[key] = _datetime(row.get(key))
            return grant_of(row)
        except Exception as exc:
            # Only an unreachable API follows the fail mode; anything else refuses the turn.
            return when_unavailable(exc, self.fail_mode, max_completion, is_unavailable)

    async def release(self, reservation_id: uuid.UUID, user_id: uuid.UUID) -> bool:
        """Give back a reservation no turn will use; if this fails, its TTL gives it back."""
        params = {"p_reservation": str(reservation_id), "p_user": str(user_id)}
        try:
            return bool(await self._rpc("vtai_release", params))
        except Exception as exc:
            log.warning("releasing a reservation failed (%s); it expires", type(exc).__name__)
            return False

    async def record(self, row: dict) -> bool:
        """Send one row: True if new, False if already recorded. Raises when it can't."""
        result = await self._rpc("vtai_record", {"p_row": _json(row), "p_period": self.period})
        return bool(result)

    async def record_batch(self, rows: list[dict]) -> list[bool]:
        """The ledger's store call: one RPC for many rows, a bool per row in order."""
        if not rows:
            return []
        result = await self._rpc(
            "vtai_record_batch", {"p_rows": _json(rows), "p_period": self.period}
        )
        if not isinstance(result, list) or len(result) != len(rows):
            # A short answer would leave rows unaccounted for; the ledger keeps them spooled.
            raise ValueError(f"vtai_record_batch answered {len(result or [])} of {len(rows)}")
        return [bool(r) for r in result]

    async def record_encoded(self, texts: list[str]) -> list[bool]:
        """record_batch() for rows already encoded by vtai.metering.encoding.encode()."""
        return await self.record_batch([json.loads(text) for text in texts])

    def is_unavailable(self, exc: BaseException) -> bool:
        return is_unavailable(exc)

    def is_bad_data(self, exc: BaseException) -> bool:
        return is_bad_data(exc)

    async def api_key_owner(self, key_hash: str) -> dict | None:
        """vtai_api_key_owner() (vtai.api.keys.owner): {key_id, user_id, label} or None."""
        rows = await self._rpc("vtai_api_key_owner", {"p_hash": key_hash})
        return dict(rows[0]) if rows else None

    async def usage(self, user_id: uuid.UUID, now: datetime | None = None) -> Usage | None:
        params = {"p_user": str(user_id), "p_period": self.period}
        if now is not None:
            params["p_now"] = now.isoformat()
        rows = await self._rpc("vtai_usage", params)
        if not rows:
            return None
        row = dict(rows[0])
        for key in ("period_start", "resets_at", "day_resets_at", "topup_until"):
            row[key] = _datetime(row.get(key))
        return usage_of(row)

    async def daily(self, user_id: uuid.UUID, since: datetime) -> list[tuple[datetime, int]]:
        """Tokens per UTC day from `since`, from the day buckets, as Gate.daily reads them."""
        totals: dict[datetime, int] = {}
        offset = 0
        while True:
            # One row per day and model: summed here, since Supabase leaves PostgREST's
            # aggregate functions off by default.
            page = (
                await self.client.table("usage_aggregates")
                .select("bucket_start,total_tokens")
                .eq("end_user", str(user_id))
                .eq("granularity", "day")
                .gte("bucket_start", since.isoformat())
                .order("bucket_start")
                .order("model")
                .limit(PAGE_ROWS)
                .offset(offset)
                .execute()
            ).data
            for row in page:
                day = _datetime(row["bucket_start"])
                totals[day] = totals.get(day, 0) + int(row["total_tokens"] or 0)
            if len(page) < PAGE_ROWS:
                return sorted(totals.items())
            offset += len(page)

    async def profile(self, user_id: uuid.UUID) -> Profile | None:
        rows = (
            await self.client.table("profiles")
            .select(PROFILE_COLUMNS)
            .eq("id", str(user_id))
            .execute()
        ).data
        return _profile(rows[0]) if rows else None

    async def create_profile(self, user_id: uuid.UUID, username: str, tier: str) -> Profile | None:
        """Insert a profile with this id; None if the username belongs to another profile."""
        try:
            rows = (
                await self.client.table("profiles")
                .insert(
                    {
                        "id": str(user_id),
                        "username": username,
                        "tier": tier,
                        # a Supabase Auth user's name is their email: kept as one, for billing
                        "email": username.strip().lower() if "@" in username else None,
                    }
                )
                .execute()
            ).data
        except APIError as exc:
            if str(exc.code) != "23505":
                raise
            # A concurrent first login made it, or the name is another profile's.
            return await self.profile(user_id)
        return _profile(rows[0])
