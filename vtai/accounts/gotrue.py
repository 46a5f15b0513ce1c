"""The Supabase Auth (GoTrue) calls behind sign-up, reset and password change.

With SUPABASE_URL and SUPABASE_ANON_KEY set (settings.supabase_auth), and always in REST-only
metering, passwords live in Supabase Auth, so these go there instead of VT.ai's own store:

- sign-up:         POST /auth/v1/signup   {email, password}
- reset request:   POST /auth/v1/recover  {email}, ?redirect_to=<this app>/reset/confirm;
                   GoTrue sends the mail itself (its SMTP settings and templates)
- reset link:      POST /auth/v1/verify   {type: recovery, token_hash} (the link carries a
                   token_hash), or the access token GoTrue's default link puts in the URL
                   fragment; then
- new password:    PUT  /auth/v1/user     {password}, with that user's access token
- password change: the current password is checked with the password grant
                   (POST /auth/v1/token?grant_type=password), whose access token then makes the
                   PUT: VT.ai's session keeps no Supabase token, and needs none.

Plain HTTP calls with the anon key, one short-lived client each: these are rare, and the
shared supabase client (vtai.rest.login) keeps session state that concurrent users must not
share. The anon key never reaches the browser.
"""

from __future__ import annotations

import logging
import uuid
from urllib.parse import urlsplit

import httpx

log = logging.getLogger(__name__)

TIMEOUT = 10.0


class GotrueRefused(Exception):
    """GoTrue said no; `code` is its error code, str() one line for the user."""

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(message)


class GotrueUnavailable(Exception):
    """GoTrue could not be asked; str() is one line for the operator."""


class Gotrue:
    def __init__(self, url: str, anon_key: str, timeout: float = TIMEOUT):
        self.base = url.rstrip("/") + "/auth/v1"
        self.host = urlsplit(url).hostname or url
        self.anon_key = anon_key
        self.timeout = timeout

    @classmethod
    def of(cls, settings) -> Gotrue:
        return cls(settings.supabase_url, settings.supabase_anon_key.get_secret_value())

    async def _call(
        self, method: str, path: str, body: dict, *, token: str | None = None, params=None
    ) -> dict:
        headers = {
            "apikey": self.anon_key,
            "Authorization": f"Bearer {token or self.anon_key}",
        }
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as http:
                r = await http.request(
                    method, self.base + path, json=body, headers=headers, params=params
                )
        except httpx.HTTPError as exc:
            raise GotrueUnavailable(
                f"Supabase Auth at {self.host} can't be reached ({type(exc).__name__}): check "
                "SUPABASE_URL and the project's status"
            ) from None
        try:
            data = r.json()
        except ValueError:
            data = None
        if r.status_code >= 500 or not isinstance(data, dict):
            raise GotrueUnavailable(
                f"Supabase Auth at {self.host} answered HTTP {r.status_code} to {path}: check "
                "SUPABASE_URL and the project's status"
            )
        if r.status_code >= 400:
            code = str(data.get("error_code") or data.get("code") or r.status_code)
            text = str(data.get("msg") or data.get("message") or data.get("error_description"))
            raise GotrueRefused(code, " ".join(text.split())[:200])
        return data

    async def sign_up(self, email: str, password: str, redirect_to: str | None) -> bool:
        """Create the user; True if they can sign in now, False if they must confirm first."""
        params = {"redirect_to": redirect_to} if redirect_to else None
        data = await self._call(
            "POST", "/signup", {"email": email, "password": password}, params=params
        )
        # With confirmations off GoTrue answers a session; with them on, the user only.
        return bool(data.get("access_token"))

    async def recover(self, email: str, redirect_to: str | None) -> None:
        params = {"redirect_to": redirect_to} if redirect_to else None
        await self._call("POST", "/recover", {"email": email}, params=params)

    async def verify_recovery(self, token_hash: str) -> str:
        """The access token of the user a recovery link's token_hash belongs to."""
        data = await self._call("POST", "/verify", {"type": "recovery", "token_hash": token_hash})
        token = data.get("access_token")
        if not token:
            raise GotrueRefused("otp_expired", "the link has expired or was already used")
        return str(token)

    async def sign_in(self, email: str, password: str) -> str:
        """An access token for this email and password; GotrueRefused if they are wrong."""
        data = await self._call(
            "POST",
            "/token",
            {"email": email, "password": password},
            params={"grant_type": "password"},
        )
        return str(data["access_token"])

    async def set_password(self, access_token: str, password: str) -> uuid.UUID | None:
        """Set the password of the user the token belongs to; their auth.users.id."""
        data = await self._call("PUT", "/user", {"password": password}, token=access_token)
        try:
            return uuid.UUID(str(data.get("id")))
        except ValueError:
            return None
