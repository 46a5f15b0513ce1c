"""`vtai user delete NAME`: the account, its chats and its content go; what it was billed stays,
anonymised. The database part is one SQL function, vtai_user_delete()
(supabase/migrations/functions/70_retention.sql); this module does what lies outside the
database first, so that a failure there leaves everything as it was and the command can run
again:

1. its Stripe subscriptions are cancelled (billing on), now, without proration;
2. with Supabase Auth, its Auth user is deleted through the Auth admin API (service key), or
   the operator is told exactly what to do;
3. it is disabled and its logins end (a turn still under way settles, under its id);
4. vtai_user_delete() runs, retried if a settle running at that moment made it a deadlock.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg
import httpx

from vtai.billing import client as billing_client

LIVE_SUBSCRIPTIONS = (
    "select subscription_id from public.billing_subscriptions"
    " where user_id = $1 and status not in ('canceled', 'incomplete_expired')"
    " order by subscription_id"
)


class DeleteError(RuntimeError):
    """One line: what stopped the deletion (nothing was deleted) and what to do."""


@dataclass
class Deleted:
    user_id: uuid.UUID
    ledger_rows: int = 0
    threads: int = 0
    billing_events: int = 0
    audit_rows: int = 0
    cancelled: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


async def cancel_subscriptions(settings, subscriptions: list[str]) -> list[str]:
    client = billing_client.make_client(settings)
    cancelled = []
    for sub_id in subscriptions:
        try:
            await client.v1.subscriptions.cancel_async(sub_id)
        except Exception as exc:
            status = getattr(exc, "http_status", None)
            if status == 404:
                continue  # gone at Stripe already
            raise DeleteError(
                f"Stripe refused to cancel subscription {sub_id} ({type(exc).__name__}"
                f"{f' HTTP {status}' if status else ''}); nothing was deleted: cancel it in the"
                " Stripe dashboard, then run this again"
            ) from None
        cancelled.append(sub_id)
    return cancelled


def auth_admin_command(settings, user_id: uuid.UUID) -> str:
    base = (settings.supabase_url or "https://<project>.supabase.co").rstrip("/")
    return (
        f"curl -X DELETE {base}/auth/v1/admin/users/{user_id} -H 'apikey: <service key>'"
        " -H 'Authorization: Bearer <service key>'"
    )


async def delete_auth_user(settings, user_id: uuid.UUID) -> str | None:
    """Delete the Supabase Auth user; None when done, else what the operator must do."""
    todo = (
        f"delete Auth user {user_id} in the Supabase dashboard (Authentication > Users) or run: "
        + auth_admin_command(settings, user_id)
    )
    if settings.supabase_service_key is None:
        return f"no SUPABASE_SERVICE_ROLE_KEY here to delete the Auth user: {todo}"
    key = settings.supabase_service_key.get_secret_value()
    url = f"{settings.supabase_url.rstrip('/')}/auth/v1/admin/users/{user_id}"
    try:
        async with httpx.AsyncClient(timeout=15) as http:
            r = await http.delete(url, headers={"apikey": key, "Authorization": f"Bearer {key}"})
    except httpx.HTTPError as exc:
        raise DeleteError(
            f"Supabase Auth can't be reached ({type(exc).__name__}); nothing was deleted: check"
            " SUPABASE_URL and run this again"
        ) from None
    if r.status_code in (200, 204, 404):
        return None
    raise DeleteError(
        f"Supabase Auth answered HTTP {r.status_code} to deleting user {user_id}; nothing was"
        f" deleted: {todo}, then run this again"
    )


async def delete_user(
    db, settings, username: str, actor: str, say: Callable[[str], None] = print
) -> Deleted:
    async with db.pool.acquire() as conn:
        user_id = await conn.fetchval(
            "select id from public.profiles where username = $1", username
        )
        if user_id is None:
            raise DeleteError(f"no user named {username!r} (see: vtai user list)")
        subscriptions = [r[0] for r in await conn.fetch(LIVE_SUBSCRIPTIONS, user_id)]
    done = Deleted(user_id)
    if subscriptions and settings.billing:
        done.cancelled = await cancel_subscriptions(settings, subscriptions)
        say(f"cancelled Stripe subscription(s) {', '.join(done.cancelled) or '(none left)'}")
    elif subscriptions:
        done.notes.append(
            f"Stripe subscription(s) {', '.join(subscriptions)} were not cancelled: billing is"
            " off here (no STRIPE_SECRET_KEY); cancel them in the Stripe dashboard"
        )
    if settings.supabase_auth:
        todo = await delete_auth_user(settings, user_id)
        if todo:
            done.notes.append(todo)
        else:
            say(f"deleted Supabase Auth user {user_id}")

    async with db.pool.acquire() as conn:
        async with conn.transaction():
            await conn.execute(
                "update public.profiles set disabled_at = coalesce(disabled_at, now())"
                " where id = $1",
                user_id,
            )
            await conn.fetchval("select public.vtai_sessions_end_all($1)", user_id)
        for attempt in range(5):
            try:
                row = await conn.fetchrow(
                    "select * from public.vtai_user_delete($1, $2)", user_id, actor
                )
                break
            except asyncpg.DeadlockDetectedError:
                if attempt == 4:
                    raise DeleteError(
                        "turns of this user kept settling while it was deleted; run this again"
                    ) from None
                await asyncio.sleep(0.1 * (attempt + 1))
    done.ledger_rows, done.threads = row["ledger_rows"], row["threads"]
    done.billing_events, done.audit_rows = row["billing_events"], row["audit_rows"]
    return done
