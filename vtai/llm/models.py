"""Which models a user can pick: the local one always, a provider's only when its key is set."""

from __future__ import annotations

import os
from collections.abc import Mapping

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm  # noqa: E402 - the env var above must be set before this import

from vtai.settings import Settings, provider_keys  # noqa: E402

LOCAL_MODEL_ID = "local/smollm2-135m"

# provider key variable -> models offered in the picker when that key is set
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


def _configured(env: Mapping[str, str] | None, settings: Settings | None) -> dict:
    """The provider keys set, from `settings`, else read by vtai.settings from `env` (default:
    this process's environment). Chainlit's CI placeholder key is not a key."""
    return settings.provider_keys if settings is not None else provider_keys(env)


def key_configured(
    var: str, env: Mapping[str, str] | None = None, settings: Settings | None = None
) -> bool:
    return var in _configured(env, settings)


def available_models(
    default: str, env: Mapping[str, str] | None = None, settings: Settings | None = None
) -> list[str]:
    """The picker's list: the configured default first, then the local model, then providers'."""
    configured = _configured(env, settings)
    models = [default, LOCAL_MODEL_ID]
    for var, offered in PROVIDER_MODELS.items():
        if var in configured:
            models.extend(offered)
    return list(dict.fromkeys(models))


def validate_model_id(model: str) -> str | None:
    """None when LiteLLM can route `model`, else a one-line reason."""
    if model == LOCAL_MODEL_ID:
        return None
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
    try:
        info = litellm.get_model_info(model)
        return int(info.get("max_input_tokens") or info.get("max_tokens") or 8192)
    except Exception:
        return 8192
