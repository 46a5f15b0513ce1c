"""The operator's model catalogue: the `models` table (supabase/migrations/
20261201001000_model_catalogue.sql), read by the app and edited by `vtai model`.

The app asks for the offered models on every turn, so the catalogue is kept in the process and
read again at most every REFRESH seconds (a query of a table of tens of rows). Without a
database pool (the Supabase REST path) the built-in list is offered; when a read fails, the
last list read stays (or the built-in one, before the first read).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from decimal import Decimal

from vtai.llm import models, patterns
from vtai.llm.models import BUILTIN_MODELS, ModelEntry
from vtai.plans import audit

log = logging.getLogger(__name__)

# How old the process's copy may get before a turn reads the table again, in seconds.
REFRESH = 5.0
READ_TIMEOUT = 2.0

# A model's weight is the one vtai_model_weight() resolves from model_weights (exact name,
# else the longest matching pattern, else 1): the weight its next reservation uses.
COLUMNS = (
    "model, display_name, api_base, api_key_env, provider_key, price_in, price_out,"
    " public.vtai_model_weight(model) as weight, enabled"
)


class CatalogueError(Exception):
    """Bad input to `vtai model`: one line naming the field."""


def _number(value) -> float | None:
    return float(value) if isinstance(value, Decimal | int | float) else None


def entry_of(row) -> ModelEntry:
    return ModelEntry(
        model=row["model"],
        display_name=row["display_name"],
        api_base=row["api_base"],
        api_key_env=row["api_key_env"],
        provider_key=row["provider_key"],
        price_in=_number(row["price_in"]),
        price_out=_number(row["price_out"]),
        weight=float(row["weight"]),
        enabled=row["enabled"],
    )


async def read(conn) -> list[ModelEntry]:
    """Every catalogued model, enabled or not, in the picker's order."""
    rows = await conn.fetch(f"select {COLUMNS} from public.models order by position, model")
    return [entry_of(r) for r in rows]


class Catalogue:
    """The process's copy of the catalogue; `entries` never waits for the database."""

    def __init__(self, pool=None, refresh: float = REFRESH):
        self.pool = pool
        self.refresh_after = refresh
        self.entries: tuple[ModelEntry, ...] = BUILTIN_MODELS
        self._by_model = {e.model: e for e in self.entries}
        self._read_at: float | None = None
        self._lock = asyncio.Lock()
        self._failing = False
        if pool is None:
            log.warning(
                "no database pool: the model catalogue (`vtai model`) is not read; offering "
                "the built-in list"
            )

    def expire(self) -> None:
        """The catalogue changed (vtai.metering.plan_watch): the next turn reads it again."""
        self._read_at = None

    def get(self, model: str) -> ModelEntry | None:
        return self._by_model.get(model)

    def _set(self, entries: list[ModelEntry]) -> None:
        self.entries = tuple(entries)
        self._by_model = {e.model: e for e in entries}
        models.set_catalogue_prices(entries)

    async def fresh(self) -> tuple[ModelEntry, ...]:
        """The entries, read again first if the copy is older than REFRESH seconds."""
        if self.pool is None:
            return self.entries
        if self._read_at is not None and time.monotonic() - self._read_at < self.refresh_after:
            return self.entries
        async with self._lock:
            if self._read_at is not None and time.monotonic() - self._read_at < self.refresh_after:
                return self.entries
            try:
                async with asyncio.timeout(READ_TIMEOUT):
                    entries = await read(self.pool)
            except Exception as exc:
                if not self._failing:
                    log.warning(
                        "reading the model catalogue failed (%s); offering the %s list",
                        type(exc).__name__,
                        "last" if self._read_at is not None else "built-in",
                    )
                self._failing = True
                # Not again on every turn while the database is away.
                self._read_at = time.monotonic()
                return self.entries
            if self._failing:
                log.info("the model catalogue is read again")
            self._failing = False
            self._set(entries)
            self._read_at = time.monotonic()
        return self.entries


# `vtai model` and /admin: edits, each in one transaction with its audit row (vtai.plans.audit);
# bad input is a CatalogueError naming the field.

# model_weights.weight's check constraint.
MAX_WEIGHT = 1_000_000


def _non_negative(text: str, field: str, maximum: int | None = None) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = float("nan")
    if not value == value or value < 0 or value == float("inf"):
        upto = "" if maximum is None else f" up to {maximum}"
        raise CatalogueError(f"{field}: must be a non-negative number{upto}, not {text!r}")
    if maximum is not None and value > maximum:
        raise CatalogueError(
            f"{field}: must be a non-negative number up to {maximum}, not {text!r}"
        )
    return value


def parse_weight(text: str, field: str = "weight") -> float:
    """A weight: a number from 0 (exempt) to 1000000 tokens counted per token."""
    return _non_negative(text, field, MAX_WEIGHT)


def parse_price(text: str | None, field: str) -> float | None:
    if text is None:
        return None
    return _non_negative(text, field)


def _entry_json(entry: ModelEntry) -> dict:
    return {
        "display_name": entry.display_name,
        "api_base": entry.api_base,
        "api_key_env": entry.api_key_env,
        "provider_key": entry.provider_key,
        "price_in": entry.price_in,
        "price_out": entry.price_out,
        "weight": entry.weight,
        "enabled": entry.enabled,
    }


async def add(
    conn,
    model: str,
    display: str | None = None,
    api_base: str | None = None,
    api_key_env: str | None = None,
    price_in: float | None = None,
    price_out: float | None = None,
    weight: float = 1.0,
    *,
    actor: str,
) -> ModelEntry:
    reason = models.validate_model_id(model)
    if reason is not None:
        raise CatalogueError(f"NAME: {reason}")
    var = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
    if api_key_env is not None and not var.match(api_key_env):
        raise CatalogueError(
            f"--api-key-env: {api_key_env!r} is not a variable name (the NAME, never the key)"
        )
    provider_key = None
    if api_base is not None:
        if not re.match(r"https?://[^\s/]+", api_base):
            raise CatalogueError(f"--api-base: {api_base!r} is not an http(s) URL")
        if api_key_env is None:
            raise CatalogueError(
                "--api-key-env: required with --api-base: the name of the variable holding "
                "that server's key"
            )
    elif model != models.LOCAL_MODEL_ID:
        import litellm

        provider = litellm.get_llm_provider(model)[1]
        provider_key = models.PROVIDER_KEY_OF.get(provider)
        if provider_key is None and api_key_env is None:
            raise CatalogueError(
                f"--api-key-env: name the variable holding {provider}'s key (or pass "
                "--api-base for an OpenAI-compatible server)"
            )
    async with conn.transaction():
        added = await conn.fetchval(
            "insert into public.models (model, display_name, api_base, api_key_env,"
            " provider_key, price_in, price_out, position)"
            " values ($1, $2, $3, $4, $5, $6, $7,"
            "  (select coalesce(max(position), 0) + 1 from public.models))"
            " on conflict (model) do nothing returning model",
            model,
            display,
            api_base,
            api_key_env,
            provider_key,
            price_in,
            price_out,
        )
        if added is None:
            raise CatalogueError(f"NAME: {model!r} is already in the catalogue")
        if weight != 1.0:
            await _set_rule(conn, model, weight)
        row = await conn.fetchrow(f"select {COLUMNS} from public.models where model = $1", model)
        entry = entry_of(row)
        await audit.record(conn, actor, audit.MODEL_ADD, model, None, _entry_json(entry))
    return entry


async def set_enabled(conn, model: str, enabled: bool, *, actor: str) -> bool:
    """Enable or disable `model`; whether that changed anything (a change is audited)."""
    async with conn.transaction():
        was = await conn.fetchval(
            "select enabled from public.models where model = $1 for update", model
        )
        if was is None:
            raise CatalogueError(f"NAME: no model {model!r} in the catalogue (see vtai model list)")
        if was == enabled:
            return False
        await conn.execute(
            "update public.models set enabled = $2, updated_at = now() where model = $1",
            model,
            enabled,
        )
        action = audit.MODEL_ENABLE if enabled else audit.MODEL_DISABLE
        await audit.record(conn, actor, action, model, {"enabled": was}, {"enabled": enabled})
    return True


def matching(pattern: str, names: list[str]) -> list[str]:
    """The names `pattern` matches, as the database's vtai_glob_like() reads it (`*` any
    characters, `/` too; `?` one; `[` and the rest themselves; case-sensitive)."""
    return [n for n in names if patterns.matches(pattern, n)]


async def _set_rule(conn, pattern: str, weight: float) -> None:
    await conn.execute(
        "insert into public.model_weights (pattern, weight) values ($1, $2)"
        " on conflict (pattern) do update set weight = excluded.weight, updated_at = now()",
        pattern,
        weight,
    )


def _weight_json(value) -> float | None:
    return None if value is None else float(value)


async def set_weight(conn, pattern: str, weight: float, *, actor: str) -> list[str]:
    """Set the weight rule for `pattern` (a model name or a shell-style pattern); it applies
    to models added later too. Returns the catalogued models it matches (none: a warning)."""
    if not pattern or len(pattern) > 200:
        raise CatalogueError("PATTERN: must be 1 to 200 characters")
    if any(c.isspace() or not c.isprintable() for c in pattern):
        raise CatalogueError(f"PATTERN: {pattern!r} has a space or a control character in it")
    async with conn.transaction():
        names = [r["model"] for r in await conn.fetch("select model from public.models")]
        was = await conn.fetchval(
            "select weight from public.model_weights where pattern = $1 for update", pattern
        )
        if was is None or float(was) != weight:
            await _set_rule(conn, pattern, weight)
            await audit.record(
                conn,
                actor,
                audit.MODEL_WEIGHT,
                pattern,
                None if was is None else {"weight": _weight_json(was)},
                {"weight": weight},
            )
    return sorted(matching(pattern, names))


async def weight_rules(conn) -> list[dict]:
    """Every weight rule, with the catalogued models its pattern matches."""
    rules = await conn.fetch(
        "select pattern, weight, updated_at from public.model_weights order by pattern"
    )
    names = [r["model"] for r in await conn.fetch("select model from public.models")]
    return [
        {
            "pattern": r["pattern"],
            "weight": float(r["weight"]),
            "updated_at": r["updated_at"].isoformat(),
            "matches": sorted(matching(r["pattern"], names)),
        }
        for r in rules
    ]
