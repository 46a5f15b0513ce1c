"""Which models a user can pick: the catalogue's enabled models whose key is set."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from vtai.settings import Settings, provider_keys

LOCAL_MODEL_ID = "local/smollm2-135m"

# provider key variable -> models offered in the picker when that key is set. The catalogue
# (the `models` table, vtai.llm.catalogue) is seeded with these; without a database pool (the
# Supabase REST path) they are the list.
PROVIDER_MODELS: dict[str, tuple[str, ...]] = {
    "OPENAI_API_KEY": ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini"),
    "ANTHROPIC_API_KEY": (
        "anthropic/claude-3-5-haiku-latest",
        "anthropic/claude-sonnet-4-20250514",
    ),
    "GEMINI_API_KEY": ("gemini/gemini-2.0-flash", "gemini/gemini-2.5-flash"),
    "OPENROUTER_API_KEY": (
        "openrouter/openai/gpt-4o-mini",
        "openrouter/meta-llama/llama-3.3-70b-instruct",
    ),
}

# LiteLLM's provider name -> the key variable its models need (`vtai model add` without
# --api-base).
PROVIDER_KEY_OF = {
    "openai": "OPENAI_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
    "gemini": "GEMINI_API_KEY",
    "openrouter": "OPENROUTER_API_KEY",
}


@dataclass(frozen=True)
class ModelEntry:
    """One catalogue row (the `models` table)."""

    model: str
    display_name: str | None = None
    api_base: str | None = None
    api_key_env: str | None = None
    provider_key: str | None = None
    price_in: float | None = None
    price_out: float | None = None
    weight: float = 1.0
    enabled: bool = True


BUILTIN_MODELS: tuple[ModelEntry, ...] = (
    ModelEntry(LOCAL_MODEL_ID, price_in=0.0, price_out=0.0),
    *(ModelEntry(m, provider_key=var) for var, ms in PROVIDER_MODELS.items() for m in ms),
)


def _configured(env: Mapping[str, str] | None, settings: Settings | None) -> dict:
    """The provider keys set, from `settings`, else read by vtai.settings from `env` (default:
    this process's environment). Chainlit's CI placeholder key is not a key."""
    return settings.provider_keys if settings is not None else provider_keys(env)


def key_configured(
    var: str, env: Mapping[str, str] | None = None, settings: Settings | None = None
) -> bool:
    return var in _configured(env, settings)


def _env_value(var: str, env: Mapping[str, str] | None) -> str | None:
    value = (os.environ if env is None else env).get(var)
    return value if value and value.strip() else None


def unavailable_reason(
    entry: ModelEntry,
    env: Mapping[str, str] | None = None,
    settings: Settings | None = None,
    configured: dict | None = None,
) -> str | None:
    """Why `entry` is not offered here, in a few words, or None when it is."""
    if not entry.enabled:
        return "disabled (vtai model enable)"
    if configured is None:
        configured = _configured(env, settings)
    if entry.provider_key and entry.provider_key not in configured:
        return f"{entry.provider_key} is not set"
    if entry.api_key_env and _env_value(entry.api_key_env, env) is None:
        return f"{entry.api_key_env} is not set"
    return None


def available_models(
    default: str,
    env: Mapping[str, str] | None = None,
    settings: Settings | None = None,
    entries: Iterable[ModelEntry] | None = None,
) -> list[str]:
    """The picker's list: the configured default first, then the catalogue's (`entries`,
    default the built-in list) enabled models whose key is configured, in its order."""
    configured = _configured(env, settings)
    models = [default]
    for entry in BUILTIN_MODELS if entries is None else entries:
        if unavailable_reason(entry, env, settings, configured) is None:
            models.append(entry.model)
    return list(dict.fromkeys(models))


def call_options(entry: ModelEntry | None, env: Mapping[str, str] | None = None) -> dict:
    """What litellm.acompletion needs beyond the model name: a catalogued OpenAI-compatible
    server's api_base, and the key read now from the variable the catalogue names."""
    if entry is None or not entry.api_base:
        return {}
    options: dict = {"api_base": entry.api_base}
    if entry.api_key_env:
        key = _env_value(entry.api_key_env, env)
        if key is not None:
            options["api_key"] = key
    return options


# The catalogue's prices, by model, as last read (vtai.llm.catalogue): tokens.cost uses them
# before LiteLLM's map.
_prices: dict[str, tuple[float, float]] = {}


def set_catalogue_prices(entries: Iterable[ModelEntry]) -> None:
    global _prices
    _prices = {
        e.model: (e.price_in or 0.0, e.price_out or 0.0)
        for e in entries
        if e.price_in is not None or e.price_out is not None
    }


def catalogue_price(model: str) -> tuple[float, float] | None:
    """(USD per prompt token, USD per completion token) from the catalogue, or None."""
    return _prices.get(model)


def validate_model_id(model: str) -> str | None:
    """None when LiteLLM can route `model`, else a one-line reason."""
    if model == LOCAL_MODEL_ID:
        return None
    # Imported where used: LiteLLM takes ~2 s to import, which every `vtai` command paid.
    import litellm

    try:
        litellm.get_llm_provider(model)
    except Exception:
        return (
            f"{model!r} is not a model LiteLLM can route; use a provider-prefixed id such as "
            f"'openai/gpt-4o-mini' or {LOCAL_MODEL_ID!r}"
        )
    return None


def context_window(model: str) -> int:
    """Max input tokens for `model`, with a conservative fallback for unknown ones."""
    if model == LOCAL_MODEL_ID:
        from vtai.llm.local_model import CONTEXT_WINDOW

        return CONTEXT_WINDOW
    import litellm

    try:
        info = litellm.get_model_info(model)
        return int(info.get("max_input_tokens") or info.get("max_tokens") or 8192)
    except Exception:
        return 8192
