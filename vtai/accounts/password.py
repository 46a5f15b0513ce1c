"""Password change by the signed-in user: the current password, then the new one.

The current password is checked behind the login throttle, under the user's name, exactly as
a login (vtai.web.sessions.throttled): the form is no faster way to guess it. A change ends
every login of the user, this one included.

With Supabase Auth the current password is checked by GoTrue's password grant, and the access
token it returns sets the new one (PUT /auth/v1/user); VT.ai keeps no Supabase token.
"""

from __future__ import annotations

import logging

from vtai.accounts import reset, rules
from vtai.accounts.gotrue import Gotrue, GotrueRefused
from vtai.db import accounts
from vtai.web import sessions

log = logging.getLogger(__name__)

WRONG = "Current password: that is not it."
SAME = "New password: the same as the current one; choose another."
DONE = "Password changed: every sign-in has ended, this one too; sign in with the new password."


async def change(services, user, current: str | None, new: str | None, again: str | None) -> str:
    """`user` is the signed-in profile (id, username, email). The line to show, or
    rules.InputError; GotrueUnavailable when Supabase Auth can't be asked."""
    secret = rules.new_password(new, again)
    if not current:
        raise rules.InputError("Current password: enter it.")
    if secret == current:
        raise rules.InputError(SAME)
    if services.settings.supabase_auth:
        return await _change_in_gotrue(services, user, current, secret)

    async def check(username: str, password: str):
        return await accounts.authenticate(services.db.pool, username, password)

    if await sessions.throttled(services, user.username, current, check) is None:
        raise rules.InputError(WRONG)
    async with services.db.pool.acquire() as conn:
        await accounts.set_password(conn, user.username, secret)
    log.info("password changed by user %s", user.id)
    return DONE


async def _change_in_gotrue(services, user, current: str, secret: str) -> str:
    auth = Gotrue.of(services.settings)
    email = user.email or user.username

    async def check(_: str, password: str):
        try:
            return await auth.sign_in(email, password)
        except GotrueRefused:
            return None

    token = await sessions.throttled(services, email, current, check)
    if token is None:
        raise rules.InputError(WRONG)
    try:
        await auth.set_password(token, secret)
    except GotrueRefused as exc:
        if exc.code in ("weak_password", "same_password"):
            raise rules.InputError(f"New password: {exc}") from None
        # e.g. reauthentication_needed ("Secure password change" on in the project).
        log.warning("Supabase Auth refused a password change: %s", exc.code)
        raise rules.InputError(
            f"Supabase Auth refused the change ({exc}): use 'Forgot your password?' instead."
        ) from None
    await reset.end_logins(services, user.id)
    log.info("password changed in Supabase Auth by user %s", user.id)
    return DONE
