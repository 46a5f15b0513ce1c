"""The database connection: the configured URL or the embedded Postgres, migrated, pooled."""

from __future__ import annotations

import asyncio
import json
import logging
from urllib.parse import urlsplit

import asyncpg

from vtai.db import migrations
from vtai.plans import audit
from vtai.settings import LIMIT_VARS, Settings

log = logging.getLogger(__name__)

# Errors that mean "the database is not answering", as opposed to a bad statement.
UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    # raised when a connection dies in the middle of a query
    asyncpg.InternalClientError,
)


class DatabaseError(RuntimeError):
    """The database can't be used; str() is one line saying why and what to do."""


def describe_connect_error(url: str, exc: BaseException) -> str:
    """One line for a failed connection that never echoes the password."""
    host = urlsplit(url).hostname or "the database"
    if isinstance(exc, asyncpg.InvalidPasswordError):
        return f"the database at {host} rejected the user or password: check the URL's credentials"
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return f"the database named in the URL does not exist on {host}"
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return f"the database user lacks a privilege on {host}: {exc.args[0] if exc.args else ''}"
    if isinstance(exc, OSError | asyncio.TimeoutError):
        return f"cannot reach the database at {host}: is it running, and is the host/port right?"
    return f"cannot use the database at {host}: {type(exc).__name__}"


def _encode_json(value) -> str:
    return json.dumps(value, default=str)


async def _reset_connection(conn: asyncpg.Connection) -> None:
    """Nothing beyond what asyncpg always does on release (roll back an open transaction).

    Its default reset (RESET ALL, UNLISTEN, advisory unlock...) costs a round trip on every
    release, which a reserve waits for. VT.ai's pooled connections keep no session state:
    migrations take their lock on a connection of their own."""


async def _init_connection(conn: asyncpg.Connection) -> None:
    for name in ("json", "jsonb"):
        await conn.set_type_codec(
            name, encoder=_encode_json, decoder=json.loads, schema="pg_catalog"
        )


def _pool_options(url: str) -> dict:
    # Supabase's transaction pooler (port 6543) can't keep prepared statements.
    port = urlsplit(url).port
    return {"statement_cache_size": 0} if port == 6543 else {}


async def connect(url: str, timeout: float = 10.0) -> asyncpg.Connection:
    try:
        conn = await asyncpg.connect(url, timeout=timeout, **_pool_options(url))
    except Exception as exc:
        raise DatabaseError(describe_connect_error(url, exc)) from None
    await _init_connection(conn)
    return conn


async def sync_tiers(conn: asyncpg.Connection, limits: dict[str, int]) -> None:
    """Apply the VTAI_LIMIT_* variables that are set to their tiers' token limits.

    A variable set overrides the tier's token limit at every start-up (seeding it the first
    time), says so in the log and, when that changes the limit, writes an audit row as
    `env:VTAI_LIMIT_*`. A tier whose variable is unset keeps its plan as last edited with
    `vtai tier set` or /admin.
    """
    for tier, limit in limits.items():
        var = LIMIT_VARS[tier]
        async with conn.transaction():
            row = await conn.fetchrow(
                "select token_limit from public.tiers where name = $1 for update", tier
            )
            if row is None:
                log.warning("%s=%d: there is no %s tier to apply it to", var, limit, tier)
                continue
            was = row["token_limit"]
            if was != limit:
                await conn.execute(
                    "update public.tiers set token_limit = $2 where name = $1", tier, limit
                )
                await audit.record(
                    conn,
                    f"env:{var}",
                    audit.TIER_SET,
                    tier,
                    {"token_limit": was},
                    {"token_limit": limit},
                )
        if was == limit:
            log.info("%s=%d sets the %s tier's token limit (unchanged)", var, limit, tier)
        else:
            log.warning(
                "%s=%d overrides the %s tier's token limit (was %s)",
                var,
                limit,
                tier,
                "no limit" if was is None else was,
            )


def gate_server_settings(reserve_commit: str) -> dict | None:
    """`fast`: a reserve's commit returns before its WAL reaches the disk. The next durable
    commit on the server (any ledger write) flushes it too; only a crash of Postgres itself
    within that moment can lose the reservation (docs/metering.md)."""
    return {"synchronous_commit": "off"} if reserve_commit == "fast" else None


class Database:
    """Owns the URL (starting the embedded server when none is set), the schema and the pool.

    Two URLs: ``admin_url`` runs the migrations and ``url`` is what the pools (and the chat
    history's data layer) connect with. With a configured database URL both are that URL, as
    the operator gave it. On the embedded server ``admin_url`` is the superuser and ``url``
    the app's own role, which is no superuser (vtai.db.embedded.prepare_app_role).
    """

    def __init__(self, settings: Settings, pool_size: int = 10):
        self.settings = settings
        self.pool_size = pool_size
        self.url: str | None = settings.database_url
        self.admin_url: str | None = settings.database_url
        self.pool: asyncpg.Pool | None = None
        # The gate's own connections: a reserve never queues behind ledger writes for one,
        # and VTAI_RESERVE_COMMIT=fast can turn off its commit's wait for the disk.
        self.gate_pool: asyncpg.Pool | None = None
        self._embedded = None

    async def open(self, migrate: bool = True) -> Database:
        if self.url is None:
            from vtai.db import embedded as embedded_pg

            try:
                self._embedded = await asyncio.to_thread(embedded_pg.start, self.settings.data_dir)
            except embedded_pg.EmbeddedPostgresError as exc:
                raise DatabaseError(str(exc)) from None
            self.admin_url = self._embedded.admin_url
            self.url = self._embedded.app_url
        if migrate or self._embedded is not None:
            conn = await connect(self.admin_url)
            try:
                if migrate:
                    await self._migrate(conn)
                if self._embedded is not None:
                    await self._prepare_app_role(conn)
            finally:
                await conn.close()
        try:
            self.pool = await self._pool(self.pool_size)
            self.gate_pool = await self._pool(
                max(2, self.pool_size // 2), gate_server_settings(self.settings.reserve_commit)
            )
        except Exception as exc:
            await self.close()
            raise DatabaseError(describe_connect_error(self.url, exc)) from None
        return self

    async def _migrate(self, conn: asyncpg.Connection) -> None:
        try:
            applied = await migrations.apply_pending(conn)
            for m in applied:
                log.info("applied %s", m.label)
            await sync_tiers(conn, self.settings.tier_limits)
        except asyncpg.PostgresError as exc:
            raise DatabaseError(f"migration failed: {type(exc).__name__}: {exc}") from None

    async def _prepare_app_role(self, conn: asyncpg.Connection) -> None:
        from vtai.db import embedded as embedded_pg

        # After the migrations, so that tables they added are granted too.
        try:
            await embedded_pg.prepare_app_role(conn, self._embedded.app_password)
        except asyncpg.PostgresError as exc:
            raise DatabaseError(
                f"could not prepare the database role {embedded_pg.APP_ROLE!r} for the app: "
                f"{type(exc).__name__}: {exc}"
            ) from None

    async def _pool(self, size: int, server_settings: dict | None = None) -> asyncpg.Pool:
        return await asyncpg.create_pool(
            self.url,
            min_size=1,
            max_size=size,
            init=_init_connection,
            reset=_reset_connection,
            timeout=10,
            command_timeout=30,
            server_settings=server_settings,
            **_pool_options(self.url),
        )

    async def close_pools(self) -> None:
        """Close the connections but leave an embedded server running (see vtai.launch)."""
        for pool in (self.gate_pool, self.pool):
            if pool is not None:
                await pool.close()
        self.pool = self.gate_pool = None

    async def close(self) -> None:
        await self.close_pools()
        if self._embedded is not None:
            await asyncio.to_thread(self._embedded.stop)
            self._embedded = None
