"""Password login through Supabase Auth, when SUPABASE_URL and SUPABASE_ANON_KEY are set.

The anon key is used here, on the server, for one call only: GoTrue's password grant. The
browser never sees a Supabase key or session; Chainlit signs its own session cookie as with
local logins. VT.ai's user id is auth.users.id, which the migrations make profiles.id.

A Supabase Auth user who has no profile yet gets one at the first successful login, on the
free tier and not an administrator. Who may sign up at all is Supabase Auth's decision
(Authentication -> Sign In / Providers in the dashboard), as it is for any Supabase app; the
profiles migration has no trigger on auth.users, so the profile can't already be there.

Not named supabase_auth: `chainlit run vtai/main.py` puts vtai/ on sys.path, where that name
would shadow the Supabase client's own supabase_auth package.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from urllib.parse import urlsplit

import httpx
from supabase_auth.errors import AuthApiError, AuthError, AuthRetryableError

from supabase import AsyncClient, AsyncClientOptions, acreate_client
from vtai.db.accounts import LoginThrottle, Profile
from vtai.metering.ports import Profiles

log = logging.getLogger(__name__)

DEFAULT_TIER = "free"


class AuthUnavailable(Exception):
    """Supabase Auth could not be asked; str() is one line naming the cause and what to do."""


class SupabaseAuth:
    def __init__(self, client: AsyncClient, url: str):
        self.client = client
        self.host = urlsplit(url).hostname or url

    @classmethod
    async def connect(cls, url: str, anon_key: str, timeout: float = 10.0) -> SupabaseAuth:
        options = AsyncClientOptions(
            httpx_client=httpx.AsyncClient(timeout=timeout),
            # Sessions are only proof of the password: nothing to refresh or keep.
            auto_refresh_token=False,
            persist_session=False,
        )
        return cls(await acreate_client(url, anon_key, options=options), url)

    async def close(self) -> None:
        if self.client.options.httpx_client is not None:
            await self.client.options.httpx_client.aclose()

    def _unavailable(self, cause: str) -> AuthUnavailable:
        return AuthUnavailable(
            f"Supabase Auth at {self.host} can't be used ({cause}): check SUPABASE_URL and the "
            "project's status; logins fail until it answers"
        )

    async def sign_in(self, email: str, password: str) -> tuple[uuid.UUID, str] | None:
        """(auth.users.id, email) if the password is right, None if refused."""
        try:
            response = await self.client.auth.sign_in_with_password(
                {"email": email, "password": password}
            )
        except AuthRetryableError as exc:
            raise self._unavailable(exc.message or "unreachable") from None
        except AuthApiError as exc:
            if exc.status >= 500:
                raise self._unavailable(f"HTTP {exc.status}") from None
            if exc.code != "invalid_credentials":
                # e.g. email_not_confirmed: the operator can act on it, the user sees the
                # same refusal as for a wrong password.
                log.info("Supabase Auth refused a login: %s", exc.code or exc.status)
            return None
        except AuthError as exc:
            log.info("Supabase Auth refused a login: %s", exc.code or type(exc).__name__)
            return None
        except httpx.HTTPStatusError as exc:
            # Not GoTrue's JSON at all: usually SUPABASE_URL points somewhere else.
            raise self._unavailable(f"HTTP {exc.response.status_code}") from None
        except (httpx.HTTPError, OSError) as exc:
            raise self._unavailable(type(exc).__name__) from None
        user = response.user
        if user is None or not user.email:
            return None
        return uuid.UUID(user.id), user.email


async def login(
    auth: SupabaseAuth,
    profiles: Profiles,
    email: str,
    password: str,
    throttle: LoginThrottle | None = None,
) -> Profile | None:
    """The profile of the Supabase Auth user with this email and password, else None."""
    key = (email or "").strip().lower()
    if throttle is not None:
        await asyncio.sleep(throttle.delay(key))
    if not key or not password:
        signed = None
    else:
        try:
            signed = await auth.sign_in(key, password)
        except AuthUnavailable as exc:
            # Not the user's fault, so it doesn't count against the throttle.
            log.error("%s", exc)
            return None
    if signed is None:
        if throttle is not None:
            throttle.failed(key)
        return None
    user_id, username = signed
    try:
        profile = await profiles.profile(user_id) or await profiles.create_profile(
            user_id, username, DEFAULT_TIER
        )
    except Exception as exc:
        log.error(
            "Supabase Auth accepted %s but the profile can't be read or created (%s: %s): "
            "check the database or the REST API",
            user_id,
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
        )
        return None
    if profile is None:
        log.error(
            "Supabase Auth user %s can't get a profile: the username %r belongs to another "
            "profile; rename that one (update public.profiles) and log in again",
            user_id,
            username,
        )
        return None
    if throttle is not None:
        throttle.succeeded(key)
    return profile
