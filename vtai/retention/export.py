"""`vtai user export NAME`: everything VT.ai holds about one user, as a ZIP of JSON files.

Read in one repeatable-read transaction, so the files agree with each other, and streamed:
the ledger goes through a server-side cursor straight into the archive, never all in memory.
Written to FILE.part and renamed when complete, so a half-written export is never mistaken for
one. Never included: the password hash, API keys' hashes, login and reset tokens.
"""

from __future__ import annotations

import json
import os
import uuid
import zipfile
from collections.abc import Callable
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path

# (file, query): each query takes $1 = the user's id (uuid) and $2 = their username.
FILES: list[tuple[str, str]] = [
    (
        "usage_counters.json",
        "select * from public.usage_counters where end_user = $1 and $2::text is not null"
        " order by period_start",
    ),
    (
        "daily_counters.json",
        "select * from public.daily_counters where end_user = $1 and $2::text is not null"
        " order by day_start",
    ),
    (
        "usage_aggregates.json",
        "select * from public.usage_aggregates where end_user = $1 and $2::text is not null"
        " order by granularity, bucket_start, model",
    ),
    (
        "request_logs.json",
        "select * from public.request_logs where end_user = $1 and $2::text is not null"
        " order by created_at, id",
    ),
    (
        "api_keys.json",
        "select id, label, prefix, created_at, last_used_at, expires_at, revoked_at"
        " from public.api_keys where user_id = $1 and $2::text is not null order by created_at",
    ),
    (
        "logins.json",
        "select created_at, expires_at, revoked_at from vtai_private.login_sessions"
        " where user_id = $1 and $2::text is not null order by created_at",
    ),
    (
        "password_resets.json",
        "select created_at, expires_at, used_at from public.password_resets"
        " where user_id = $1 and $2::text is not null order by created_at",
    ),
    (
        "billing_customers.json",
        "select * from public.billing_customers where user_id = $1 and $2::text is not null",
    ),
    (
        "billing_subscriptions.json",
        "select * from public.billing_subscriptions where user_id = $1 and $2::text is not null"
        " order by updated_at",
    ),
    (
        "billing_events.json",
        "select * from public.billing_events where user_id = $1 and $2::text is not null"
        " order by created",
    ),
    (
        "token_grants.json",
        "select * from public.token_grants where end_user = $1 and $2::text is not null"
        " order by created_at",
    ),
    (
        "audit_log.json",
        "select * from public.audit_log where actor = $2 or target = $2 or target = $1::uuid::text"
        " or starts_with(target, $2 || '/') order by at, id",
    ),
    (
        "threads.json",
        'select * from public."Thread" where "userId" = $1::uuid::text and $2::text is not null'
        ' order by "createdAt"',
    ),
    (
        "steps.json",
        'select s.* from public."Step" s join public."Thread" t on t.id = s."threadId"'
        ' where t."userId" = $1::uuid::text and $2::text is not null order by s."createdAt", s.id',
    ),
    (
        "elements.json",
        'select e.* from public."Element" e join public."Thread" t on t.id = e."threadId"'
        ' where t."userId" = $1::uuid::text and $2::text is not null order by e."createdAt"',
    ),
    (
        "feedback.json",
        'select f.* from public."Feedback" f join public."Step" s on s.id = f."stepId"'
        ' join public."Thread" t on t.id = s."threadId"'
        ' where t."userId" = $1::uuid::text and $2::text is not null order by f."createdAt"',
    ),
]

PROFILE = (
    "select id, username, email, tier, is_admin, created_at, disabled_at"
    " from public.profiles where username = $1"
)


class ExportError(RuntimeError):
    """One line: why there is no export."""


def _plain(value):
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _json(value) -> str:
    return json.dumps(value, default=_plain, ensure_ascii=False, sort_keys=True)


def _row(record) -> dict:
    row = dict(record)
    for key, value in row.items():
        # A connection without the json codec hands jsonb over as its text.
        if isinstance(value, str) and key in ("messages", "response", "error", "payload"):
            try:
                row[key] = json.loads(value)
            except ValueError:
                pass
    return row


async def export(
    conn, username: str, path: Path, progress: Callable[[str, int], None] | None = None
) -> dict[str, int]:
    """Write the ZIP to `path`; rows written per file."""
    path = Path(path)
    part = path.with_name(path.name + ".part")
    counts: dict[str, int] = {}
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            profile = await conn.fetchrow(PROFILE, username)
            if profile is None:
                raise ExportError(f"no user named {username!r} (see: vtai user list)")
            with zipfile.ZipFile(part, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                zf.writestr("profile.json", _json(dict(profile)) + "\n")
                for name, query in FILES:
                    n = 0
                    with zf.open(name, "w") as out:
                        out.write(b"[")
                        async for record in conn.cursor(
                            query, profile["id"], username, prefetch=500
                        ):
                            out.write((",\n" if n else "\n").encode())
                            out.write(_json(_row(record)).encode())
                            n += 1
                            if progress and n % 10000 == 0:
                                progress(name, n)
                        out.write(b"\n]\n" if n else b"]\n")
                    counts[name] = n
                    if progress:
                        progress(name, n)
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
    return counts
