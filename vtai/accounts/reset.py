"""Password reset by email: ask for a link, then set a new password with it, once.

VT.ai's own accounts: a token valid for an hour and one use (vtai.accounts.store), mailed over
SMTP (vtai.accounts.mail). With Supabase Auth, GoTrue makes and mails the link
(/auth/v1/recover) and checks it (/auth/v1/verify); the password is set there.

The answer to a request is the same whether or not the email has an account, and the mail
goes out after the answer, so its time doesn't tell either. A disabled account gets no link,
and a link it already had stops working.
"""

from __future__ import annotations

import asyncio
import logging

from vtai.accounts import mail, rules, store, throttle
from vtai.accounts.gotrue import Gotrue, GotrueRefused

log = logging.getLogger(__name__)

SENT = (
    "If an account has this email, a link to set a new password is on its way. "
    "It works once, within an hour."
)
DEAD = "This link has expired or was already used: ask for a new one."
DONE = "Password set: every earlier sign-in has ended; sign in with the new password."
SUBJECT = "Set a new VT.ai password"

# Mails being sent after their answer went out; kept so the tasks are not collected midway.
_sending: set[asyncio.Task] = set()


def available(settings) -> bool:
    """Whether reset can work here: Supabase Auth sends its own mail, else SMTP is needed."""
    return settings.supabase_auth or settings.email


def _body(link: str) -> str:
    return (
        "Someone (we hope you) asked to set a new password for this VT.ai account.\n\n"
        f"Open this link within an hour to choose one; it works once:\n\n{link}\n\n"
        "If it wasn't you, ignore this email: your password stays as it is.\n"
    )


async def _mail(settings, to: str, link: str) -> None:
    try:
        await mail.send(settings, to, SUBJECT, _body(link))
        log.info("password reset link mailed")
    except mail.MailError as exc:
        log.error("password reset: %s", exc)


async def request(services, email: str | None, origin: str) -> str:
    """The line to show; rules.InputError, throttle.Throttled or GotrueUnavailable."""
    settings = services.settings
    address = rules.email(email)
    await throttle.admit(services, throttle.RESET, address)
    confirm = f"{origin}/reset/confirm"
    if settings.supabase_auth:
        try:
            await Gotrue.of(settings).recover(address, confirm)
        except GotrueRefused as exc:
            # Rate limits and the like: the user gets the same line, the operator the code.
            log.warning("Supabase Auth refused a reset request: %s", exc.code)
        return SENT
    async with services.db.pool.acquire() as conn:
        account = await store.by_email(conn, address)
        if account is None:
            return SENT
        token = await store.new_reset(conn, account.id)
    task = asyncio.create_task(_mail(settings, account.email, f"{confirm}?token={token}"))
    _sending.add(task)
    task.add_done_callback(_sending.discard)
    return SENT


async def usable(services, token: str) -> bool:
    if services.settings.supabase_auth:
        return True  # GoTrue says when it is used; nothing to ask before
    if not token:
        return False
    async with services.db.pool.acquire() as conn:
        return await store.reset_usable(conn, token)


async def confirm(
    services,
    password: str | None,
    again: str | None,
    *,
    token: str = "",
    token_hash: str = "",
    access_token: str = "",
) -> str:
    """Set the new password; rules.InputError (DEAD for a dead link) or GotrueUnavailable.

    `token` is VT.ai's own; with Supabase Auth, `token_hash` (a link made from GoTrue's
    {{ .TokenHash }}) or `access_token` (the fragment of GoTrue's default link).
    """
    secret = rules.new_password(password, again)
    settings = services.settings
    if settings.supabase_auth:
        auth = Gotrue.of(settings)
        try:
            if token_hash:
                access_token = await auth.verify_recovery(token_hash)
            if not access_token:
                raise rules.InputError(DEAD)
            user_id = await auth.set_password(access_token, secret)
        except GotrueRefused as exc:
            if exc.code in ("weak_password", "same_password"):
                raise rules.InputError(f"New password: {exc}") from None
            raise rules.InputError(DEAD) from None
        if user_id is not None:
            await end_logins(services, user_id)
        return DONE
    async with services.db.pool.acquire() as conn:
        if await store.use_reset(conn, token, secret) is None:
            raise rules.InputError(DEAD)
    return DONE


async def end_logins(services, user_id) -> None:
    """End the user's VT.ai logins after a password change made in Supabase Auth."""
    try:
        if services.db is not None:
            await services.db.pool.fetchval("select public.vtai_sessions_end_all($1)", user_id)
        else:
            await services.store._rpc("vtai_sessions_end_all", {"p_user": str(user_id)})
    except Exception as exc:
        log.error(
            "password changed, but the user's logins could not be ended (%s)",
            type(exc).__name__,
        )
