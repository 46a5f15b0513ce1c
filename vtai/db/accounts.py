"""Accounts: profiles, argon2 password hashes, and login checks with a brake on guessing."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass

import asyncpg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from vtai.plans import audit

_hasher = PasswordHasher()
# Verified when the username is unknown, so a miss costs the same time as a wrong password.
_DUMMY_HASH = _hasher.hash("not-a-real-password")


class UserError(ValueError):
    """A bad request about a user; str() is one line for the person who made it."""


@dataclass(frozen=True)
class Profile:
    id: uuid.UUID
    username: str
    tier: str
    is_admin: bool


def _profile(row: asyncpg.Record | None) -> Profile | None:
    if row is None:
        return None
    return Profile(row["id"], row["username"], row["tier"], row["is_admin"])


async def _check_tier(conn: asyncpg.Connection, tier: str) -> None:
    tiers = [r["name"] for r in await conn.fetch("select name from public.tiers order by rank")]
    if tier not in tiers:
        raise UserError(f"unknown tier {tier!r}: choose one of {', '.join(tiers)}")


async def create_user(
    conn: asyncpg.Connection,
    username: str,
    password: str,
    tier: str = "free",
    is_admin: bool = False,
) -> Profile:
    username = username.strip()
    if not username or any(c.isspace() for c in username) or len(username) > 64:
        raise UserError("a username is 1-64 characters with no spaces")
    if not password or not password.strip():
        raise UserError("the password is empty")
    await _check_tier(conn, tier)
    password_hash = await asyncio.to_thread(_hasher.hash, password)
    async with conn.transaction():
        row = await conn.fetchrow(
            "insert into public.profiles (username, tier, is_admin) values ($1, $2, $3)"
            " on conflict (username) do nothing returning id, username, tier, is_admin",
            username,
            tier,
            is_admin,
        )
        if row is None:
            raise UserError(f"user {username!r} already exists")
        await conn.execute(
            "insert into vtai_private.credentials (profile_id, password_hash) values ($1, $2)",
            row["id"],
            password_hash,
        )
    return _profile(row)


async def get_by_name(conn: asyncpg.Connection, username: str) -> Profile | None:
    return _profile(
        await conn.fetchrow(
            "select id, username, tier, is_admin from public.profiles where username = $1",
            username,
        )
    )


async def get_by_id(conn: asyncpg.Connection | asyncpg.Pool, user_id: uuid.UUID) -> Profile | None:
    return _profile(
        await conn.fetchrow(
            "select id, username, tier, is_admin from public.profiles where id = $1", user_id
        )
    )


async def create_profile(
    conn: asyncpg.Connection | asyncpg.Pool, user_id: uuid.UUID, username: str, tier: str
) -> Profile | None:
    """A profile under a given id (a Supabase Auth user's); None if the name is taken.

    No credentials row: the password lives in Supabase Auth.
    """
    row = await conn.fetchrow(
        # A Supabase Auth user's name is their email: kept as the email too, for billing.
        "insert into public.profiles (id, username, tier, email) values ($1, $2, $3,"
        " case when $2 like '%_@_%' then lower(trim($2)) end)"
        " on conflict do nothing returning id, username, tier, is_admin",
        user_id,
        username,
        tier,
    )
    # Nothing inserted: a concurrent first login made it, or the name is another profile's.
    return _profile(row) if row else await get_by_id(conn, user_id)


class PoolProfiles:
    """Profile reads and first-login creation over a direct connection.

    The same two calls as vtai.rest.store.SupabaseStore, so Supabase Auth logins work the
    same way on either metering path.
    """

    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def profile(self, user_id: uuid.UUID) -> Profile | None:
        return await get_by_id(self.pool, user_id)

    async def create_profile(self, user_id: uuid.UUID, username: str, tier: str) -> Profile | None:
        return await create_profile(self.pool, user_id, username, tier)


async def require(conn: asyncpg.Connection, username: str) -> Profile:
    profile = await get_by_name(conn, username)
    if profile is None:
        raise UserError(f"no user named {username!r} (see: vtai user list)")
    return profile


async def set_tier(conn: asyncpg.Connection, username: str, tier: str) -> Profile:
    await _check_tier(conn, tier)
    row = await conn.fetchrow(
        "update public.profiles set tier = $2 where username = $1"
        " returning id, username, tier, is_admin",
        username,
        tier,
    )
    if row is None:
        raise UserError(f"no user named {username!r} (see: vtai user list)")
    return _profile(row)


async def set_password(conn: asyncpg.Connection, username: str, password: str) -> int:
    """Set the password and end every login made with the old one; how many were ended."""
    if not password or not password.strip():
        raise UserError("the password is empty")
    profile = await require(conn, username)
    password_hash = await asyncio.to_thread(_hasher.hash, password)
    async with conn.transaction():
        await conn.execute(
            "insert into vtai_private.credentials (profile_id, password_hash) values ($1, $2)"
            " on conflict (profile_id) do update set password_hash = excluded.password_hash,"
            " updated_at = now()",
            profile.id,
            password_hash,
        )
        return await conn.fetchval("select public.vtai_sessions_end_all($1)", profile.id)


async def end_sessions(conn: asyncpg.Connection, username: str, actor: str | None = None) -> int:
    """End every login of the user (their cookies are refused from the next request); audited
    as `actor` (default cli:<OS user>)."""
    profile = await require(conn, username)
    async with conn.transaction():
        ended = await conn.fetchval("select public.vtai_sessions_end_all($1)", profile.id)
        await audit.record(
            conn, actor or audit.cli_actor(), "user.logout", username, None, {"sessions": ended}
        )
    return ended


async def set_disabled(
    conn: asyncpg.Connection, username: str, disabled: bool, actor: str | None = None
) -> int:
    """Disable (ending every login, refusing new ones) or enable; logins ended. Audited as
    `actor` (default cli:<OS user>) when it changes something."""
    async with conn.transaction():
        was_disabled = await conn.fetchval(
            "select disabled_at is not null from public.profiles where username = $1 for update",
            username,
        )
        user_id = await conn.fetchval(
            "update public.profiles set disabled_at = case when $2 then"
            " coalesce(disabled_at, now()) end where username = $1 returning id",
            username,
            disabled,
        )
        if user_id is None:
            raise UserError(f"no user named {username!r} (see: vtai user list)")
        ended = 0
        if disabled:
            ended = await conn.fetchval("select public.vtai_sessions_end_all($1)", user_id)
        if was_disabled != disabled:
            action = "user.disable" if disabled else "user.enable"
            await audit.record(conn, actor or audit.cli_actor(), action, username, None, None)
        return ended


async def disabled_names(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch("select username from public.profiles where disabled_at is not null")
    return {r["username"] for r in rows}


async def list_users(conn: asyncpg.Connection) -> list[Profile]:
    rows = await conn.fetch(
        "select id, username, tier, is_admin from public.profiles order by username"
    )
    return [_profile(r) for r in rows]


async def any_admin(conn: asyncpg.Connection) -> bool:
    return await conn.fetchval("select exists(select 1 from public.profiles where is_admin)")


class LoginThrottle:
    """Slows repeated failed logins per username: 0 s for the first few, then doubling to 8 s.

    Process-local, so parallel guesses get past it: only the fallback when the database's
    vtai_login_attempt() can't be reached (vtai/web/sessions.py holds the real throttle).
    """

    FREE_TRIES = 3
    WINDOW = 300.0
    MAX_DELAY = 8.0

    def __init__(self) -> None:
        self._failures: dict[str, list[float]] = defaultdict(list)

    def delay(self, username: str, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        recent = [t for t in self._failures.get(username, []) if now - t < self.WINDOW]
        self._failures[username] = recent
        extra = len(recent) - self.FREE_TRIES
        return 0.0 if extra < 0 else min(self.MAX_DELAY, 0.5 * 2**extra)

    def failed(self, username: str) -> None:
        self._failures[username].append(time.monotonic())

    def succeeded(self, username: str) -> None:
        self._failures.pop(username, None)


async def burn_hash(password: str) -> None:
    """The hashing work of a password check, for a login refused before any check."""
    try:
        await asyncio.to_thread(_hasher.verify, _DUMMY_HASH, password or "")
    except (VerificationError, InvalidHashError):
        pass


async def authenticate(
    pool: asyncpg.Pool, username: str, password: str, throttle: LoginThrottle | None = None
) -> Profile | None:
    """The profile if the password is right; a disabled account answers as an unknown name."""
    username = (username or "").strip()
    if throttle is not None:
        await asyncio.sleep(throttle.delay(username))
    row = await pool.fetchrow(
        "select p.id, p.username, p.tier, p.is_admin, c.password_hash"
        " from public.profiles p join vtai_private.credentials c on c.profile_id = p.id"
        # the name, else the email in any case (sign-ups are stored lowercased)
        " where (p.username = $1 or lower(p.email) = lower($1)) and p.disabled_at is null"
        " order by p.username = $1 desc limit 1",
        username,
    )
    stored = row["password_hash"] if row else _DUMMY_HASH
    try:
        ok = await asyncio.to_thread(_hasher.verify, stored, password or "")
    except (VerificationError, InvalidHashError):
        ok = False
    ok = ok and row is not None
    if throttle is not None:
        (throttle.succeeded if ok else throttle.failed)(username)
    return _profile(row) if ok else None
