"""The /admin Plans panel: each tier's plan, the model catalogue with its weights and whether
each model is offered here, and the audit trail; and the edits it makes.

Every edit is validated first (one line naming the form's field when bad), then saved in one
transaction with its audit row, the admin's username as who (vtai.plans.audit).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import asyncpg

from vtai.llm import catalogue, models
from vtai.plans import audit, tiers
from vtai.settings import LIMIT_VARS

# The CLI's names in catalogue's messages -> the form's.
_FORM_FIELDS = {
    "NAME": "model",
    "PATTERN": "pattern",
    "WEIGHT": "weight",
    "--display": "display",
    "--api-base": "api_base",
    "--api-key-env": "api_key_env",
    "--price-in": "price_in",
    "--price-out": "price_out",
    "--weight": "weight",
}


class FormError(ValueError):
    """Bad input from the panel: one line naming the form's field."""


def _form_error(exc: Exception) -> FormError:
    text = str(exc)
    field, sep, rest = text.partition(": ")
    if sep and field in _FORM_FIELDS:
        text = f"{_FORM_FIELDS[field]}: {rest}"
    for flag, name in _FORM_FIELDS.items():
        if flag.startswith("--"):
            text = text.replace(flag, name)
    return FormError(text)


def model_row(entry: models.ModelEntry) -> dict:
    """A catalogue entry as the panel shows it; `reason` says why it is not offered here
    (disabled, or the variable holding its provider's key is unset), None when it is."""
    reason = models.unavailable_reason(entry)
    return {
        "model": entry.model,
        "display_name": entry.display_name,
        "api_base": entry.api_base,
        "key_variable": entry.api_key_env or entry.provider_key,
        "price_in": entry.price_in,
        "price_out": entry.price_out,
        "weight": entry.weight,
        "enabled": entry.enabled,
        "available": reason is None,
        "reason": reason,
    }


async def panel(pool: asyncpg.Pool, limits: Mapping[str, int]) -> dict:
    async with pool.acquire() as conn:
        plans = await tiers.read(conn)
        entries = await catalogue.read(conn)
        weights = await catalogue.weight_rules(conn)
        trail = await audit.newest(conn)
    return {
        "tiers": [p.as_dict() for p in plans],
        "models": [model_row(e) for e in entries],
        "weights": weights,
        "audit": trail,
        "overrides": {t: {"variable": LIMIT_VARS[t], "value": v} for t, v in limits.items()},
    }


def _text(name: str, value: Any) -> str:
    """A form value as text: null is none; numbers as written; a list of models joined."""
    if value is None:
        return tiers.NONE
    if isinstance(value, bool):
        raise FormError(f"{name}: expected a number or none, not {str(value).lower()}")
    if isinstance(value, int | float | str):
        return str(value)
    if name == "models" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    raise FormError(f"{name}: expected text, not {type(value).__name__}")


async def save_plan(
    pool: asyncpg.Pool, tier: str, body: Any, actor: str, limits: Mapping[str, int]
) -> dict:
    """Save the fields `body` gives (absent: unchanged; blank or none: no cap)."""
    if not isinstance(body, dict) or not body:
        raise FormError(
            'tier: send {"tokens": ..., "daily": ..., "usd": ..., "rpm": ..., "models": ...}'
        )
    for name in body:
        if name not in tiers.FIELDS:
            raise FormError(f"{name}: not a plan field ({', '.join(tiers.FIELDS)})")
    given = {name: _text(name, value) for name, value in body.items()}
    try:
        changes = tiers.parse_changes(given)
        async with pool.acquire() as conn:
            saved = await tiers.save(
                conn, tier, changes, actor, tier_field="tier", models_field="models"
            )
    except tiers.PlanError as exc:
        raise FormError(str(exc)) from None
    warnings = list(saved.warnings)
    override = tiers.env_override(tier, changes, limits)
    if override and saved.changed:
        warnings.append(override)
    return {"plan": saved.after.as_dict(), "changed": saved.changed, "warnings": warnings}


def _optional(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise FormError(f"{name}: expected text")
    return str(value).strip()


async def add_model(pool: asyncpg.Pool, body: Any, actor: str) -> dict:
    if not isinstance(body, dict):
        raise FormError('model: send {"model": "<LiteLLM name>", ...}')
    name = _optional(body, "model")
    if name is None:
        raise FormError("model: the LiteLLM model name, e.g. openai/my-model")
    try:
        price_in = catalogue.parse_price(_optional(body, "price_in"), "price_in")
        price_out = catalogue.parse_price(_optional(body, "price_out"), "price_out")
        weight = catalogue.parse_weight(_optional(body, "weight") or "1", "weight")
        async with pool.acquire() as conn:
            entry = await catalogue.add(
                conn,
                name,
                _optional(body, "display"),
                _optional(body, "api_base"),
                _optional(body, "api_key_env"),
                price_in,
                price_out,
                weight,
                actor=actor,
            )
    except catalogue.CatalogueError as exc:
        raise _form_error(exc) from None
    return model_row(entry)


async def set_enabled(pool: asyncpg.Pool, body: Any, actor: str) -> dict:
    if not isinstance(body, dict):
        raise FormError('model: send {"model": "<name>", "enabled": true|false}')
    name, enabled = body.get("model"), body.get("enabled")
    if not isinstance(name, str) or not name:
        raise FormError("model: which model (its LiteLLM name)")
    if not isinstance(enabled, bool):
        raise FormError("enabled: true or false")
    try:
        async with pool.acquire() as conn:
            changed = await catalogue.set_enabled(conn, name, enabled, actor=actor)
    except catalogue.CatalogueError as exc:
        raise _form_error(exc) from None
    return {"model": name, "enabled": enabled, "changed": changed}


async def set_weight(pool: asyncpg.Pool, body: Any, actor: str) -> dict:
    if not isinstance(body, dict):
        raise FormError('pattern: send {"pattern": "<name or pattern>", "weight": <number>}')
    pattern = body.get("pattern")
    if not isinstance(pattern, str):
        raise FormError("pattern: a model name or a pattern such as openrouter/*")
    pattern = pattern.strip()
    try:
        weight = catalogue.parse_weight(_text("weight", body.get("weight", "")), "weight")
        async with pool.acquire() as conn:
            matches = await catalogue.set_weight(conn, pattern, weight, actor=actor)
    except catalogue.CatalogueError as exc:
        raise _form_error(exc) from None
    warnings = [] if matches else [f"pattern: no model matches {pattern!r}"]
    return {"pattern": pattern, "weight": weight, "matches": matches, "warnings": warnings}
