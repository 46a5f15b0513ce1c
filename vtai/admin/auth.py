"""Who may use /admin (and /account): the signed-in user's profile, `profiles.is_admin` for
/admin, read from the database on every request (the JWT's copy is made at login and can be
stale), and the origin rule.

Nothing here is cached, not even for a second: a demoted or disabled admin's very next
request is refused. It costs one primary-key read per request (well under a millisecond);
the app's time per admin request went to JSON encoding and a thread hop, not to this.
"""

import uuid

import asyncpg
from fastapi import HTTPException, Request

from vtai.web import origins


class NotSignedIn(Exception):
    pass


async def user_from_request(request: Request, pool: asyncpg.Pool) -> asyncpg.Record:
    """The signed-in user's profile row (id, username, tier, is_admin), read now.

    NotSignedIn without a valid session, or when the profile is gone or disabled (its logins
    have ended). In the app, vtai.web.sessions has already refused a login that ended.
    """
    from chainlit.auth import get_token_from_cookies
    from chainlit.auth.jwt import decode_jwt

    token = get_token_from_cookies(request.cookies)
    if not token:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        token = value.strip() if scheme.lower() == "bearer" else None
    if not token:
        raise NotSignedIn
    try:
        user = decode_jwt(token)
    except Exception:
        raise NotSignedIn from None
    user_id = (user.metadata or {}).get("id")
    try:
        key = uuid.UUID(str(user_id)) if user_id else None
    except ValueError:
        key = None
    columns = "id, username, tier, is_admin, disabled_at"
    if key is not None:
        row = await pool.fetchrow(f"select {columns} from public.profiles where id = $1", key)
    else:
        row = await pool.fetchrow(
            f"select {columns} from public.profiles where username = $1", user.identifier
        )
    if row is None or row["disabled_at"] is not None:
        raise NotSignedIn
    return row


async def admin_from_request(request: Request, pool: asyncpg.Pool) -> asyncpg.Record:
    """The admin's profile row; NotSignedIn without a valid session, 403 for anyone else."""
    row = await user_from_request(request, pool)
    if not row["is_admin"]:
        raise HTTPException(status_code=403, detail="administrators only")
    return row


async def same_origin(request: Request) -> None:
    """403 for a state-changing request from a page on another origin (vtai.web.origins' rule).

    The cookie is SameSite=lax, so a page on another port of the same host still sends it.
    Async, though it never waits: FastAPI runs a plain `def` dependency in a worker thread,
    a thread hop on every admin request.
    """
    if request.method in origins.SAFE_METHODS:
        return
    if not origins.request_origin_allowed(request.headers):
        raise HTTPException(403, "cross-origin request refused")
