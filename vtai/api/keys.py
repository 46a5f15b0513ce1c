"""Personal API keys: made, listed and revoked here; `owner()` is what /v1 asks on every request.

A key is `vtai-` and 43 URL-safe characters (32 random bytes). It is shown once, in the answer
that creates it, and never stored, logged or audited: the database keeps its sha256 (key_hash),
its first PREFIX_CHARS characters (for a person to recognise it), when it was last used, and
an optional expiry. A key belongs to its user: revoked, expired, or its user disabled or
deleted, and the next request with it is refused (vtai_api_key_owner(), in
supabase/migrations/functions/40_api_keys.sql, checks each of those on every call).

Creating and revoking write the audit trail (vtai.plans.audit) in the same transaction, with
who did it: the user themself (their username), an admin (theirs) or `cli:<OS user>`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from vtai.plans import audit

if TYPE_CHECKING:
    from vtai.services import Services

log = logging.getLogger(__name__)

KEY_PREFIX = "vtai-"
SECRET_CHARS = 43  # secrets.token_urlsafe(32): 32 bytes, base64url without padding
KEY_PATTERN = re.compile(f"{KEY_PREFIX}[A-Za-z0-9_-]{{{SECRET_CHARS}}}")
PREFIX_CHARS = 12  # "vtai-" and 7 characters of the secret: recognisable, nothing to guess
LABEL_MAX = 100
MAX_EXPIRES_DAYS = 3650
# Active (not revoked, not expired) keys a user may hold at once.
MAX_ACTIVE = 50

SHOWN_ONCE = "This key is shown once: copy it now. It is not stored and can't be shown again."

# The audit trail's `action` for keys; `target` is "<username>/<prefix>".
KEY_CREATE = "key.create"
KEY_REVOKE = "key.revoke"

_COLUMNS = (
    "k.id, k.user_id, p.username, k.label, k.prefix, k.created_at, k.last_used_at,"
    " k.expires_at, k.revoked_at"
)


class ApiKeyError(ValueError):
    """Bad input: one line naming the field (label, expires, user, key)."""


class KeyNotFound(LookupError):
    """No such key (or not one of this user's)."""


class KeysUnavailable(Exception):
    """The key store can't be asked (database unreachable, function missing); one line."""


@dataclass(frozen=True)
class KeyOwner:
    key_id: uuid.UUID
    user_id: uuid.UUID
    label: str


@dataclass(frozen=True)
class ApiKey:
    id: uuid.UUID
    user_id: uuid.UUID
    username: str
    label: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None

    def state(self, now: datetime | None = None) -> str:
        """active, revoked or expired (revoked wins: it is what someone did)."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= (now or datetime.now(UTC)):
            return "expired"
        return "active"

    def as_dict(self) -> dict[str, Any]:
        iso = lambda v: None if v is None else v.isoformat()  # noqa: E731
        return {
            "id": str(self.id),
            "user_id": str(self.user_id),
            "username": self.username,
            "label": self.label,
            "prefix": self.prefix,
            "created_at": iso(self.created_at),
            "last_used_at": iso(self.last_used_at),
            "expires_at": iso(self.expires_at),
            "revoked_at": iso(self.revoked_at),
            "state": self.state(),
        }


def _key(row) -> ApiKey:
    return ApiKey(**{name: row[name] for name in ApiKey.__dataclass_fields__})


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(token: str) -> str:
    """The stored form of a key: sha256, hex.

    A fast hash is right here, unlike for passwords: a key is 256 random bits, so there is no
    dictionary to try and brute force is out of reach at any hashing speed; a slow hash would
    only make every /v1 request slower. Unsalted, so the database can find the key by it.
    """
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def well_formed(token: object) -> bool:
    return isinstance(token, str) and KEY_PATTERN.fullmatch(token) is not None


def check_label(label: object) -> str:
    if not isinstance(label, str) or not label.strip():
        raise ApiKeyError("label: name the key (1 to 100 characters), e.g. laptop")
    text = label.strip()
    if len(text) > LABEL_MAX:
        raise ApiKeyError(f"label: at most {LABEL_MAX} characters, not {len(text)}")
    if any(not ch.isprintable() for ch in text):
        raise ApiKeyError("label: printable characters only")
    return text


def expiry_in_days(days: object, name: str = "expires_days") -> datetime | None:
    """None (never) for None or blank; else now + days, 1 to MAX_EXPIRES_DAYS whole days."""
    if days is None or (isinstance(days, str) and not days.strip()):
        return None
    if isinstance(days, bool):
        raise ApiKeyError(f"{name}: a whole number of days, 1 to {MAX_EXPIRES_DAYS}")
    try:
        value = int(days.strip()) if isinstance(days, str) else days
    except ValueError:
        value = None
    if not isinstance(value, int) or not 1 <= value <= MAX_EXPIRES_DAYS:
        raise ApiKeyError(f"{name}: a whole number of days, 1 to {MAX_EXPIRES_DAYS}")
    return datetime.now(UTC) + timedelta(days=value)


async def create(
    conn,
    user_id: uuid.UUID,
    label: str,
    expires_at: datetime | None = None,
    *,
    actor: str,
) -> tuple[ApiKey, str]:
    """A new key for `user_id`: (its record, the key). The key exists only in the answer."""
    label = check_label(label)
    if expires_at is not None:
        if expires_at.tzinfo is None:
            raise ApiKeyError("expires: a time with its time zone")
        if expires_at <= datetime.now(UTC):
            raise ApiKeyError("expires: a time in the future")
    plain = new_key()
    async with conn.transaction():
        # Locks the profile: one user's creates queue, so the active-key cap holds.
        profile = await conn.fetchrow(
            "select username, disabled_at from public.profiles where id = $1 for update",
            user_id,
        )
        if profile is None:
            raise ApiKeyError("user: no such user")
        if profile["disabled_at"] is not None:
            raise ApiKeyError(f"user: {profile['username']} is disabled")
        active = await conn.fetchval(
            "select count(*) from public.api_keys where user_id = $1 and revoked_at is null"
            " and (expires_at is null or expires_at > now())",
            user_id,
        )
        if active >= MAX_ACTIVE:
            raise ApiKeyError(f"label: {MAX_ACTIVE} active keys already; revoke one first")
        row = await conn.fetchrow(
            "insert into public.api_keys (user_id, label, prefix, key_hash, expires_at)"
            " values ($1, $2, $3, $4, $5)"
            " returning id, user_id, $6::text as username, label, prefix, created_at,"
            " last_used_at, expires_at, revoked_at",
            user_id,
            label,
            plain[:PREFIX_CHARS],
            hash_key(plain),
            expires_at,
            profile["username"],
        )
        key = _key(row)
        await audit.record(conn, actor, KEY_CREATE, _target(key), None, _audited(key))
    log.info("%s created API key %s for %s", actor, key.prefix, key.username)
    return key, plain


def _target(key: ApiKey) -> str:
    return f"{key.username}/{key.prefix}"


def _audited(key: ApiKey) -> dict:
    """What the audit trail keeps of a key: never the hash, never the key."""
    return {
        "id": str(key.id),
        "label": key.label,
        "prefix": key.prefix,
        "expires_at": key.expires_at,
        "revoked_at": key.revoked_at,
    }


async def list_keys(conn, user_id: uuid.UUID | None = None) -> list[ApiKey]:
    """One user's keys, or everyone's (user_id None), newest first."""
    rows = await conn.fetch(
        f"select {_COLUMNS} from public.api_keys k join public.profiles p on p.id = k.user_id"
        " where $1::uuid is null or k.user_id = $1 order by k.created_at desc, k.id",
        user_id,
    )
    return [_key(r) for r in rows]


async def get(conn, key_id: uuid.UUID, user_id: uuid.UUID | None = None) -> ApiKey | None:
    row = await conn.fetchrow(
        f"select {_COLUMNS} from public.api_keys k join public.profiles p on p.id = k.user_id"
        " where k.id = $1 and ($2::uuid is null or k.user_id = $2)",
        key_id,
        user_id,
    )
    return _key(row) if row else None


async def revoke(
    conn, key_id: uuid.UUID, user_id: uuid.UUID | None = None, *, actor: str
) -> tuple[ApiKey, bool]:
    """Revoke a key: (the key, whether this call revoked it). With `user_id`, only that
    user's key (someone else's is KeyNotFound, as if it did not exist); None: any (admins).
    Revoking a revoked key changes nothing and records nothing."""
    async with conn.transaction():
        row = await conn.fetchrow(
            "update public.api_keys k set revoked_at = now() from public.profiles p"
            " where k.id = $1 and ($2::uuid is null or k.user_id = $2)"
            " and k.revoked_at is null and p.id = k.user_id"
            f" returning {_COLUMNS}",
            key_id,
            user_id,
        )
        if row is None:
            found = await get(conn, key_id, user_id)
            if found is None:
                raise KeyNotFound(f"key: no key {key_id}")
            return found, False
        key = _key(row)
        before = _audited(key) | {"revoked_at": None}
        await audit.record(conn, actor, KEY_REVOKE, _target(key), before, _audited(key))
    log.info("%s revoked API key %s of %s", actor, key.prefix, key.username)
    return key, True


async def usage(conn, key_ids: list[uuid.UUID], period: str) -> dict[uuid.UUID, int]:
    """Tokens counted against each key this period (from the ledger: partial index
    request_logs_api_key_period_idx, so only the keys' own rows are read)."""
    if not key_ids:
        return {}
    # Each key's owner's period (a subscriber's own with VTAI_USAGE_PERIOD=billing).
    rows = await conn.fetch(
        "select r.api_key_id, coalesce(sum(coalesce(r.counted_tokens, r.total_tokens)), 0)"
        " as tokens from public.api_keys k"
        " cross join lateral public.vtai_user_period(k.user_id, $2, now()) up"
        " join public.request_logs r"
        " on r.api_key_id = k.id and r.period_start = up.period_start"
        " where k.id = any($1::uuid[]) group by r.api_key_id",
        key_ids,
        period,
    )
    found = {r["api_key_id"]: int(r["tokens"]) for r in rows}
    return {k: found.get(k, 0) for k in key_ids}


# --- the lookup /v1 makes on every request ---------------------------------------------------


def _owner(row) -> KeyOwner | None:
    if not row:
        return None
    return KeyOwner(uuid.UUID(str(row["key_id"])), uuid.UUID(str(row["user_id"])), row["label"])


# Hashes of keys recently found unknown, so a flood of made-up keys can't keep the gate's
# connections busy (a key is 256 random bits: one made up now won't be created later).
_UNKNOWN: dict[str, float] = {}
UNKNOWN_KEPT = 10_000
UNKNOWN_FOR = 300.0
# Lookups in flight at once, and how long one waits for its turn before the API says 503:
# chat turns share the gate's pool and must always find a connection.
LOOKUPS = 2
LOOKUP_WAIT = 2.0
_lookups: asyncio.Semaphore | None = None


def _known_unknown(digest: str) -> bool:
    at = _UNKNOWN.get(digest)
    return at is not None and time.monotonic() - at < UNKNOWN_FOR


def _remember_unknown(digest: str) -> None:
    if len(_UNKNOWN) >= UNKNOWN_KEPT:
        _UNKNOWN.pop(next(iter(_UNKNOWN)))
    _UNKNOWN[digest] = time.monotonic()


async def owner(services: Services, token: str) -> KeyOwner | None:
    """Whose key `token` is: None for a malformed, unknown, revoked or expired key, or one whose
    user is disabled or deleted. Never raises for bad input; raises KeysUnavailable (one line)
    only when the database can't be asked.

    Direct database: the gate's pool (a lookup never queues behind ledger writes). REST-only
    mode: the same function over PostgREST RPC with the service key. Concurrent requests with
    the same key share one lookup, so a burst of one made-up key asks the database once.
    """
    if not well_formed(token):
        return None
    digest = hash_key(token)
    if _known_unknown(digest):
        return None
    shared = _in_flight.get(digest)
    if shared is None:
        shared = asyncio.ensure_future(_look_up(services, digest))
        _in_flight[digest] = shared
        shared.add_done_callback(lambda f: _settled(digest, f))
    return await asyncio.shield(shared)


# Lookups under way, by key hash: callers with the same key await the same one.
_in_flight: dict[str, asyncio.Future] = {}


def _settled(digest: str, done: asyncio.Future) -> None:
    _in_flight.pop(digest, None)
    if not done.cancelled():
        done.exception()  # retrieved: every caller may have gone (a disconnect) before it ended


async def _look_up(services: Services, digest: str) -> KeyOwner | None:
    global _lookups
    if _lookups is None:
        _lookups = asyncio.Semaphore(LOOKUPS)
    try:
        async with asyncio.timeout(LOOKUP_WAIT):
            await _lookups.acquire()
    except TimeoutError:
        raise KeysUnavailable("API key lookups are saturated: try again shortly") from None
    try:
        if _known_unknown(digest):  # found unknown while this one waited its turn
            return None
        if services.db is None:
            return _owner(await services.store.api_key_owner(digest))
        pool = services.db.gate_pool or services.db.pool
        found = _owner(await pool.fetchrow("select * from public.vtai_api_key_owner($1)", digest))
        # Only a key that doesn't exist is remembered: a disabled user may be enabled again.
        if found is None and not await pool.fetchval(
            "select exists (select 1 from public.api_keys where key_hash = $1)", digest
        ):
            _remember_unknown(digest)
        return found
    except Exception as exc:
        text = str(exc).splitlines()[0] if str(exc) else ""
        missing = "vtai_api_key_owner" in text and (
            "does not exist" in text or "Could not find" in text or "PGRST202" in text
        )
        hint = (
            "the database lacks vtai_api_key_owner (functions/40_api_keys.sql): restart the app"
            " or run `python scripts/setup_supabase.py`"
            if missing
            else type(exc).__name__
        )
        log.error("API key lookup failed: %s", hint)
        raise KeysUnavailable("API keys can't be checked right now: try again shortly") from exc
    finally:
        _lookups.release()
