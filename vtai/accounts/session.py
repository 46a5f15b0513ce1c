"""Who is signed in, from Chainlit's session cookie, as /account reads it (vtai.admin.auth).

vtai.web.sessions has already refused a cookie whose login ended (for a page load it strips
it, so it reads here as no sign-in at all). With a database the profile is read now (a
disabled user is no user); in REST-only mode over PostgREST.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from fastapi import Request

from vtai.admin.auth import NotSignedIn, user_from_request


@dataclass(frozen=True)
class SignedIn:
    id: uuid.UUID
    username: str
    email: str | None


async def signed_in(services, request: Request) -> SignedIn:
    """The signed-in user; NotSignedIn without a live login."""
    if services.db is not None:
        row = await user_from_request(request, services.db.pool)
        email = await services.db.pool.fetchval(
            "select email from public.profiles where id = $1", row["id"]
        )
        return SignedIn(row["id"], row["username"], email)
    from chainlit.auth import get_token_from_cookies
    from chainlit.auth.jwt import decode_jwt

    token = get_token_from_cookies(request.cookies)
    if not token:
        raise NotSignedIn
    try:
        user_id = uuid.UUID(str((decode_jwt(token).metadata or {})["id"]))
    except Exception:
        raise NotSignedIn from None
    profile = await services.store.profile(user_id)
    if profile is None:
        raise NotSignedIn
    return SignedIn(profile.id, profile.username, None)
