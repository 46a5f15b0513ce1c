"""Self sign-up (VTAI_SIGNUP=on): an email and a password make a free-tier user.

VT.ai's own accounts log in with the email as their username (Chainlit's login form has one
name field), lower-cased. With Supabase Auth the user is made there (POST /auth/v1/signup);
their profile is made at their first login, as for every Supabase Auth user (vtai.rest.login).
"""

from __future__ import annotations

import logging

from vtai.accounts import rules, store, throttle
from vtai.accounts.gotrue import Gotrue, GotrueRefused

log = logging.getLogger(__name__)

OFF = "Sign-up is off on this server: ask the administrator for an account."
TAKEN = "Email: an account with this email already exists; sign in, or reset its password."
CREATED = "Account created: sign in with your email and password."
CONFIRM = "Account created: open the link in the email we sent you, then sign in."


async def sign_up(services, email: str | None, password: str | None, redirect_to: str) -> str:
    """The line to show once the account exists.

    rules.InputError (bad or taken email, weak password), throttle.Throttled, or
    gotrue.GotrueUnavailable; nothing is made unless it returns.
    """
    settings = services.settings
    address = rules.email(email, as_username=not settings.supabase_auth)
    secret = rules.new_password(password)
    await throttle.admit(services, throttle.SIGNUP, address)
    if settings.supabase_auth:
        try:
            ready = await Gotrue.of(settings).sign_up(address, secret, redirect_to)
        except GotrueRefused as exc:
            if exc.code in ("user_already_exists", "email_exists"):
                raise rules.InputError(TAKEN) from None
            if exc.code == "weak_password":
                raise rules.InputError(f"New password: {exc}") from None
            if exc.code in ("email_address_invalid", "validation_failed"):
                raise rules.InputError(f"Email: {exc}") from None
            log.warning("Supabase Auth refused a sign-up: %s", exc.code)
            raise rules.InputError(f"Sign-up refused by Supabase Auth: {exc}") from None
        log.info("self sign-up through Supabase Auth")
        return CREATED if ready else CONFIRM
    async with services.db.pool.acquire() as conn:
        try:
            profile = await store.create(conn, address, secret)
        except store.EmailTaken:
            raise rules.InputError(TAKEN) from None
        except store.EmailRefused:
            raise rules.InputError(f"Email: {address[:80]!r} can't be stored as typed.") from None
    log.info("self sign-up: user %s on the free tier", profile.id)
    return CREATED
