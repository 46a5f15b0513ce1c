"""VT.ai's own accounts in Postgres: emails on profiles, and one-time reset tokens.

Passwords are hashed by vtai.db.accounts (argon2), as for every other account. A reset token
is 32 random bytes; only its sha256 is stored, so a copy of the table opens no account.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import timedelta

import asyncpg

from vtai.db import accounts

RESET_TTL = timedelta(hours=1)
DEFAULT_TIER = "free"


class EmailTaken(Exception):
    """An account already has this email (any case)."""


class EmailRefused(Exception):
    """The database's rule on emails refused it (lower-case and trimmed as Postgres sees it)."""


@dataclass(frozen=True)
class Account:
    id: uuid.UUID
    username: str
    email: str


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def create(conn: asyncpg.Connection, email: str, password: str) -> accounts.Profile:
    """A free-tier user whose username and email are `email` (normalised by the caller)."""
    try:
        async with conn.transaction():
            if await conn.fetchval(
                "select 1 from public.profiles where lower(email) = $1 or username = $1", email
            ):
                raise EmailTaken
            profile = await accounts.create_user(conn, email, password, DEFAULT_TIER)
            await conn.execute(
                "update public.profiles set email = $2 where id = $1", profile.id, email
            )
    except asyncpg.UniqueViolationError:
        # A concurrent sign-up with the same email won the race.
        raise EmailTaken from None
    except asyncpg.CheckViolationError:
        # Python's lower() and the database's differ on a few non-ASCII letters.
        raise EmailRefused from None
    except accounts.UserError as exc:
        if "already exists" in str(exc):
            raise EmailTaken from None
        raise
    return profile


async def by_email(conn: asyncpg.Connection, email: str) -> Account | None:
    """The enabled account with this email (any case); a disabled one is no account here."""
    row = await conn.fetchrow(
        "select id, username, email from public.profiles"
        " where lower(email) = $1 and disabled_at is null",
        email,
    )
    return Account(row["id"], row["username"], row["email"]) if row else None


async def new_reset(conn: asyncpg.Connection, user_id: uuid.UUID) -> str:
    """A fresh reset token for the user (returned once, stored hashed), valid for RESET_TTL."""
    token = secrets.token_urlsafe(32)
    await conn.execute(
        "insert into public.password_resets (token_hash, user_id, expires_at)"
        " values ($1, $2, now() + $3::interval)",
        token_hash(token),
        user_id,
        RESET_TTL,
    )
    # Keep the table small: tokens dead for a day are of no use even to an audit.
    await conn.execute(
        "delete from public.password_resets where ctid in (select ctid from"
        " public.password_resets where expires_at < now() - interval '1 day' limit 100)"
    )
    return token


async def reset_usable(conn: asyncpg.Connection, token: str) -> bool:
    """Whether the token would set a password now (the form is shown only for one that would)."""
    return bool(
        await conn.fetchval(
            "select 1 from public.password_resets r join public.profiles p on p.id = r.user_id"
            " where r.token_hash = $1 and r.used_at is null and r.expires_at > now()"
            " and p.disabled_at is null",
            token_hash(token),
        )
    )


async def use_reset(conn: asyncpg.Connection, token: str, password: str) -> str | None:
    """Set the password with a reset token, once; the username, or None if it can't be used.

    The token is marked used, the user's other tokens too, the password set and every login
    of the user ended, in one transaction: a failure leaves the token as it was.
    """
    async with conn.transaction():
        row = await conn.fetchrow(
            "update public.password_resets r set used_at = now()"
            " from public.profiles p"
            " where r.token_hash = $1 and r.used_at is null and r.expires_at > now()"
            " and p.id = r.user_id and p.disabled_at is null"
            " returning r.user_id, p.username",
            token_hash(token),
        )
        if row is None:
            return None
        await conn.execute(
            "update public.password_resets set used_at = now()"
            " where user_id = $1 and used_at is null",
            row["user_id"],
        )
        await accounts.set_password(conn, row["username"], password)
    return row["username"]
