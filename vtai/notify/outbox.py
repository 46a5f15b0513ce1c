"""The outbox's SQL functions (supabase/migrations/functions/60_notify.sql), called over a direct
connection or Supabase's REST API alike: every rule is in SQL, so each call here is one
function call by name with named arguments, and answers rows as dicts."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg


class Calls:
    """`await calls.rows("vtai_fn", p_x=1)`: the function's rows as dicts."""

    async def rows(self, fn: str, **params: Any) -> list[dict]:
        raise NotImplementedError


class PoolCalls(Calls):
    def __init__(self, pool: asyncpg.Pool, timeout: float = 10.0):
        self.pool = pool
        self.timeout = timeout

    async def rows(self, fn: str, **params: Any) -> list[dict]:
        # JSON goes as text: the same whichever json codec the pool's connections have.
        args = ", ".join(
            f"{n} => ${i}::text::jsonb" if isinstance(v, dict) else f"{n} => ${i}"
            for i, (n, v) in enumerate(params.items(), 1)
        )
        values = [json.dumps(v, default=str) if isinstance(v, dict) else v for v in params.values()]
        found = await self.pool.fetch(
            f"select * from public.{fn}({args})", *values, timeout=self.timeout
        )
        return [dict(r) for r in found]


def _rest_value(value: Any) -> Any:
    if isinstance(value, uuid.UUID | datetime):
        return str(value) if isinstance(value, uuid.UUID) else value.isoformat()
    return value


def _from_rest(row: dict) -> dict:
    out = {}
    for key, value in row.items():
        if isinstance(value, str) and key.endswith(("_at", "_start", "created")):
            try:
                value = datetime.fromisoformat(value)
            except ValueError:
                pass
        out[key] = value
    return out


class RestCalls(Calls):
    """The same calls over PostgREST RPC (REST-only mode: vtai.rest.store)."""

    def __init__(self, store):
        self.store = store

    async def rows(self, fn: str, **params: Any) -> list[dict]:
        data = await self.store._rpc(fn, {k: _rest_value(v) for k, v in params.items()})
        if data is None:
            return []
        if isinstance(data, list):
            return [_from_rest(r) if isinstance(r, dict) else {fn: r} for r in data]
        return [_from_rest(data) if isinstance(data, dict) else {fn: data}]


def calls_for(services) -> Calls:
    """The calls of a running process: its pool, else its REST store."""
    if services.db is not None:
        return PoolCalls(services.db.pool)
    return RestCalls(services.store)


async def scalar(calls: Calls, fn: str, **params: Any) -> Any:
    rows = await calls.rows(fn, **params)
    if not rows:
        return None
    return next(iter(rows[0].values()))


async def add(calls: Calls, type_: str, payload: dict, dedupe: str | None = None) -> str | None:
    """One event (public.vtai_outbox_add): its id, or None when webhooks are off."""
    found = await scalar(calls, "vtai_outbox_add", p_type=type_, p_payload=payload, p_dedupe=dedupe)
    return None if found is None else str(found)


@dataclass(frozen=True)
class Claimed:
    event_id: str
    url: str
    type: str
    payload: dict
    created: datetime
    attempt: int

    def event(self) -> dict:
        """The JSON a receiver gets."""
        return {
            "id": self.event_id,
            "type": self.type,
            "created": int(self.created.timestamp()),
            "data": self.payload,
        }


def _payload(value: Any) -> dict:
    if isinstance(value, str):
        return json.loads(value)
    return value or {}


async def claim(calls: Calls, limit: int, lease: float) -> list[Claimed]:
    rows = await calls.rows("vtai_outbox_claim", p_limit=limit, p_lease_seconds=lease)
    return [
        Claimed(
            str(r["event_id"]),
            r["url"],
            r["type"],
            _payload(r["payload"]),
            r["created_at"],
            r["attempt"],
        )  # fmt: skip
        for r in rows
    ]


async def done(calls: Calls, c: Claimed, status: int | None, error: str | None, base: float) -> str:
    return await scalar(
        calls,
        "vtai_outbox_done",
        p_event=uuid.UUID(c.event_id),
        p_url=c.url,
        p_attempt=c.attempt,
        p_status=status,
        p_error=error,
        p_base_seconds=base,
    )


async def set_endpoints(calls: Calls, urls: tuple[str, ...]) -> int:
    return int(await scalar(calls, "vtai_webhook_endpoints_set", p_urls=list(urls)) or 0)


async def status(calls: Calls) -> list[dict]:
    return await calls.rows("vtai_outbox_status")


async def failures(calls: Calls, limit: int = 50) -> list[dict]:
    return await calls.rows("vtai_outbox_failures", p_limit=limit)


async def retry(calls: Calls) -> int:
    return int(await scalar(calls, "vtai_outbox_retry") or 0)
