"""The audit trail: `public.audit_log`, append-only (a trigger refuses update, delete and
truncate, for the table's owner too), readable by admins only (/admin; RLS, no anon rights).

Every change to a plan, a model weight, a catalogued model or a user's tier writes one row,
in the same transaction as the change, so a change and its record commit or fail together.
Who: an admin's username, `cli:<OS user>` for `vtai`, `env:VTAI_LIMIT_*` for a start-up
override.
"""

from __future__ import annotations

import getpass
import json
import os
from typing import Any

# What `action` says; `target` is the tier, the model (or weight pattern) or the username.
TIER_SET = "tier.set"
MODEL_ADD = "model.add"
MODEL_ENABLE = "model.enable"
MODEL_DISABLE = "model.disable"
MODEL_WEIGHT = "model.weight"
USER_TIER = "user.tier"

NEWEST = 50


def cli_actor() -> str:
    """`cli:<OS user>`, as `vtai` records itself."""
    try:
        name = getpass.getuser()
    except Exception:  # no login name in the environment nor the password database
        name = f"uid{os.getuid()}"
    return f"cli:{name}"


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, default=str, sort_keys=True)


async def record(conn, actor: str, action: str, target: str, before: Any, after: Any) -> None:
    """One audit row, inside the caller's transaction (the change's own)."""
    if not conn.is_in_transaction():
        raise RuntimeError("audit.record() runs inside the transaction of the change it records")
    # ::text::jsonb: the JSON text as it is, whichever json codec the connection has.
    await conn.execute(
        "insert into public.audit_log (actor, action, target, before, after)"
        " values ($1, $2, $3, $4::text::jsonb, $5::text::jsonb)",
        actor,
        action,
        target,
        _json(before),
        _json(after),
    )


async def newest(conn, limit: int = NEWEST) -> list[dict]:
    """The newest `limit` rows, newest first, JSON-ready."""
    rows = await conn.fetch(
        "select id, at, actor, action, target, before::text as before, after::text as after"
        " from public.audit_log order by at desc, id desc limit $1",
        limit,
    )
    return [
        {
            "id": r["id"],
            "at": r["at"].isoformat(),
            "actor": r["actor"],
            "action": r["action"],
            "target": r["target"],
            "before": None if r["before"] is None else json.loads(r["before"]),
            "after": None if r["after"] is None else json.loads(r["after"]),
        }
        for r in rows
    ]
