"""Plans: each tier's caps and models (`public.tiers`), read, parsed from `vtai tier set` and the
/admin Plans form, and saved one tier at a time with its audit row.

A tier's plan: tokens per period (`token_limit`), tokens per UTC day (`daily_limit`), USD per
period (`usd_limit`), requests per minute (`rpm`), each null for no cap; and the LiteLLM model
names or shell-style patterns it may use (`models`; `*` matches any characters, `/` too, `?`
one). vtai_reserve() (supabase/migrations/functions/20_metering.sql) enforces them.

Bad input is a PlanError whose str() is one line naming the field. A pattern that matches no
catalogued model is a warning, not an error: the model may be added later.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from vtai.llm import catalogue
from vtai.plans import audit
from vtai.settings import LIMIT_VARS

COLUMNS = "name, rank, token_limit, daily_limit, usd_limit, rpm, models"

# The form's and the CLI's names for the columns (`--daily`, `daily`), in display order.
FIELDS = {
    "tokens": "token_limit",
    "daily": "daily_limit",
    "usd": "usd_limit",
    "rpm": "rpm",
    "models": "models",
}
BIGINT_MAX = 2**63 - 1
INTEGER_MAX = 2**31 - 1
# numeric(18, 8)
USD_PLACES = 8
USD_MAX = Decimal("9999999999.99999999")
MAX_PATTERNS = 200
MAX_PATTERN_CHARS = 200
NONE = "none"


class PlanError(ValueError):
    """Bad input for a plan: one line naming the field."""


@dataclass(frozen=True)
class Plan:
    name: str
    rank: int
    token_limit: int | None
    daily_limit: int | None
    usd_limit: Decimal | None
    rpm: int | None
    models: tuple[str, ...]

    def value(self, column: str) -> Any:
        """A column's value, JSON-ready (dollars as exact text, patterns as a list)."""
        value = getattr(self, column)
        if isinstance(value, Decimal):
            return usd_text(value)
        if isinstance(value, tuple):
            return list(value)
        return value

    def as_dict(self) -> dict:
        return {"name": self.name, "rank": self.rank} | {
            column: self.value(column) for column in FIELDS.values()
        }


def usd_text(value: Decimal) -> str:
    """1.5 -> '1.50', 0.00012 -> '0.00012': at least cents, no trailing zeros beyond."""
    text = format(value.normalize(), "f")
    whole, _, cents = text.partition(".")
    return f"{whole}.{cents.ljust(2, '0')}"


def shown(value: Any) -> str:
    """A cap as `vtai tier show` prints it: `-` for none."""
    if value is None:
        return "-"
    if isinstance(value, Decimal):
        return usd_text(value)
    if isinstance(value, tuple | list):
        return ",".join(value)
    return str(value)


def _plan(row) -> Plan:
    return Plan(
        name=row["name"],
        rank=row["rank"],
        token_limit=row["token_limit"],
        daily_limit=row["daily_limit"],
        usd_limit=row["usd_limit"],
        rpm=row["rpm"],
        models=tuple(row["models"]),
    )


async def read(conn) -> list[Plan]:
    rows = await conn.fetch(f"select {COLUMNS} from public.tiers order by rank, name")
    return [_plan(r) for r in rows]


async def names(conn) -> list[str]:
    return [r["name"] for r in await conn.fetch("select name from public.tiers order by rank")]


# --- Parsing: one field at a time, `field` as the person typed it (`--daily`, `daily`) -------


def _is_none(text: str) -> bool:
    return text.strip().lower() in (NONE, "")


def parse_whole(text: str, field: str, maximum: int = BIGINT_MAX) -> int | None:
    """A cap in whole tokens or requests, 0 or more; `none` (or blank) for no cap."""
    if _is_none(text):
        return None
    raw = text.strip().replace("_", "")
    try:
        value = int(raw)
    except ValueError:
        raise PlanError(f"{field}: {text!r} is not a whole number (or none for no cap)") from None
    if value < 0:
        raise PlanError(f"{field}: {value} is negative: a cap is 0 or more, or none for no cap")
    if value > maximum:
        raise PlanError(f"{field}: {value} is above the maximum of {maximum}")
    return value


def parse_usd(text: str, field: str) -> Decimal | None:
    """A cap in US dollars, 0 or more, up to 8 decimal places; `none` (or blank) for no cap."""
    if _is_none(text):
        return None
    raw = text.strip().removeprefix("$").replace("_", "")
    try:
        value = Decimal(raw)
    except InvalidOperation:
        value = None
    if value is None or not value.is_finite():
        raise PlanError(f"{field}: {text!r} is not an amount in US dollars (or none for no cap)")
    if value < 0:
        raise PlanError(f"{field}: {text.strip()} is negative: a cap is 0 or more, or none")
    if value > USD_MAX:
        raise PlanError(f"{field}: {text.strip()} is above the maximum of {USD_MAX}")
    if value != value.quantize(Decimal(1).scaleb(-USD_PLACES)):
        raise PlanError(f"{field}: {text.strip()} has more than {USD_PLACES} decimal places")
    return value


def parse_models(text: str, field: str) -> tuple[str, ...]:
    """Comma-separated LiteLLM model names or patterns (`local/*,gpt-4o-mini`; `*`: all)."""
    patterns = [p.strip() for p in text.split(",") if p.strip()]
    if not patterns:
        raise PlanError(f"{field}: name at least one model or pattern (* for every model)")
    for p in patterns:
        if len(p) > MAX_PATTERN_CHARS:
            raise PlanError(f"{field}: {p[:40]!r}... is longer than {MAX_PATTERN_CHARS} characters")
        if any(c.isspace() or not c.isprintable() for c in p):
            raise PlanError(f"{field}: {p!r} has a space or a control character in it")
    unique = tuple(dict.fromkeys(patterns))
    if len(unique) > MAX_PATTERNS:
        raise PlanError(f"{field}: at most {MAX_PATTERNS} patterns, not {len(unique)}")
    return unique


def parse_changes(values: Mapping[str, str | None], prefix: str = "") -> dict[str, Any]:
    """{column: value} for the fields given (None: not given); `prefix` + name names a field."""
    parsers = {
        "tokens": lambda t, f: parse_whole(t, f),
        "daily": lambda t, f: parse_whole(t, f),
        "usd": parse_usd,
        "rpm": lambda t, f: parse_whole(t, f, INTEGER_MAX),
        "models": parse_models,
    }
    changes: dict[str, Any] = {}
    for name, column in FIELDS.items():
        text = values.get(name)
        if text is not None:
            changes[column] = parsers[name](text, prefix + name)
    return changes


def unmatched(patterns: tuple[str, ...], models: list[str]) -> list[str]:
    """The patterns that match none of `models` (the SQL glob's rules, catalogue.matching)."""
    return [p for p in patterns if not catalogue.matching(p, models)]


def env_override(tier: str, changes: Mapping[str, Any], limits: Mapping[str, int]) -> str | None:
    """A warning when a VTAI_LIMIT_* variable will put back the token limit being changed."""
    if "token_limit" not in changes or tier not in limits:
        return None
    if changes["token_limit"] == limits[tier]:
        return None
    return (
        f"{LIMIT_VARS[tier]}={limits[tier]} is set: the next start-up puts the {tier} tier's "
        "token limit back to it (unset the variable to keep this edit)"
    )


# --- Saving -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Saved:
    before: Plan
    after: Plan
    warnings: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.before != self.after


async def save(
    conn,
    tier: str,
    changes: Mapping[str, Any],
    actor: str,
    *,
    tier_field: str = "TIER",
    models_field: str = "--models",
) -> Saved:
    """Apply `changes` ({column: value}, from parse_changes) to `tier` and write its audit row
    (only the columns that changed, before and after), in one transaction. Nothing changed:
    nothing is written."""
    unknown = set(changes) - set(FIELDS.values())
    if unknown:
        raise PlanError(f"{sorted(unknown)[0]}: not a plan field")
    async with conn.transaction():
        row = await conn.fetchrow(
            f"select {COLUMNS} from public.tiers where name = $1 for update", tier
        )
        if row is None:
            choices = ", ".join(await names(conn))
            raise PlanError(f"{tier_field}: unknown tier {tier!r}: choose one of {choices}")
        before = _plan(row)
        warnings: list[str] = []
        if "models" in changes:
            catalogued = [r["model"] for r in await conn.fetch("select model from public.models")]
            warnings = [
                f"{models_field}: {p!r} matches no model in the catalogue (vtai model list)"
                for p in unmatched(tuple(changes["models"]), catalogued)
            ]
        diff = {
            column: tuple(value) if column == "models" else value
            for column, value in changes.items()
            if (tuple(value) if column == "models" else value) != getattr(before, column)
        }
        if not diff:
            return Saved(before, before, warnings)
        columns = list(diff)
        assignments = ", ".join(f"{c} = ${i + 2}" for i, c in enumerate(columns))
        row = await conn.fetchrow(
            f"update public.tiers set {assignments} where name = $1 returning {COLUMNS}",
            tier,
            *(list(diff[c]) if c == "models" else diff[c] for c in columns),
        )
        after = _plan(row)
        await audit.record(
            conn,
            actor,
            audit.TIER_SET,
            tier,
            {c: before.value(c) for c in columns},
            {c: after.value(c) for c in columns},
        )
    return Saved(before, after, warnings)
