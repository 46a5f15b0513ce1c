"""Metering through the Supabase REST API, for deployments with a service key but no DB URL.

The same SQL functions as the direct path (vtai_reserve, vtai_record, vtai_usage) are called
over PostgREST RPC with the async client, so no request blocks the event loop. The direct
connection stays preferred (one round trip, no REST hop); see docs/supabase.md.

The key must be the service_role key: the migrations revoke these functions from anon and
authenticated, so the public anon key gets "permission denied" by design.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime

import httpx
from postgrest.exceptions import APIError

from supabase import AsyncClient, AsyncClientOptions, acreate_client
from vtai.gate import Grant, Usage, when_unavailable
from vtai.ledger import sanitize

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


class SupabaseStore:
    """reserve / record / usage over RPC, mirroring vtai.gate.Gate and vtai.ledger.Ledger."""

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
    ) -> Grant:
        params = {
            "p_user": str(user_id),
            "p_prompt_tokens": prompt_tokens,
            "p_max_completion": max_completion,
            "p_period": self.period,
            "p_ttl_seconds": self.ttl_seconds,
        }
        if now is not None:
            params["p_now"] = now.isoformat()
        try:
            rows = await self._rpc("vtai_reserve", params)
            row = dict(rows[0])
        except Exception as exc:
            return when_unavailable(exc, self.fail_mode, max_completion, is_unavailable)
        if row.get("reservation_id"):
            row["reservation_id"] = uuid.UUID(row["reservation_id"])
        for key in ("period_start", "resets_at"):
            row[key] = _datetime(row.get(key))
        return Grant(**row)

    async def record(self, row: dict) -> bool:
        """Send one row: True if new, False if already recorded. Raises when it can't."""
        # Through json so datetimes and uuids travel as vtai_record() parses them.
        payload = json.loads(json.dumps(sanitize(row), default=str))
        result = await self._rpc("vtai_record", {"p_row": payload, "p_period": self.period})
        return bool(result)

    async def usage(self, user_id: uuid.UUID, now: datetime | None = None) -> Usage | None:
        params = {"p_user": str(user_id), "p_period": self.period}
        if now is not None:
            params["p_now"] = now.isoformat()
        rows = await self._rpc("vtai_usage", params)
        if not rows:
            return None
        row = dict(rows[0])
        for key in ("period_start", "resets_at"):
            row[key] = _datetime(row.get(key))
        return Usage(**row)
