"""Provider failures as one line for the user: the cause and what to do next.

Raw exception text is never shown: providers echo request details there, sometimes keys.
"""

from __future__ import annotations

import litellm

_KEY_VARS = {
    "openai": "OPENAI_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
    "gemini": "GEMINI_API_KEY",
    "openrouter": "OPENROUTER_API_KEY",
}


def _provider(model: str) -> str:
    try:
        return litellm.get_llm_provider(model)[1]
    except Exception:
        return model.split("/", 1)[0] if "/" in model else "the provider"


def user_message(exc: BaseException, model: str, timeout: float, partial: bool = False) -> str:
    provider = _provider(model)
    if partial:
        return (
            f"The answer from {model} was cut off by a provider error ({type(exc).__name__}). "
            "What arrived is shown above; retry for a full answer."
        )
    if isinstance(exc, litellm.AuthenticationError | litellm.PermissionDeniedError):
        var = _KEY_VARS.get(provider, "the provider's API key variable")
        return f"{provider} rejected the API key for {model}: the operator should check {var}."
    if isinstance(exc, litellm.RateLimitError):
        return f"{provider} is rate-limiting requests right now: wait a moment, then retry."
    if isinstance(exc, litellm.Timeout):
        return f"{model} did not answer within {timeout:.0f} s: retry, or pick another model."
    if isinstance(exc, litellm.ContextWindowExceededError):
        return f"This conversation is too long for {model}: start a new chat or shorten it."
    if isinstance(exc, litellm.NotFoundError):
        return f"{model} is not available from {provider}: pick another model in the settings."
    if isinstance(exc, litellm.APIConnectionError):
        return f"Could not reach {provider} for {model}: retry in a moment."
    if isinstance(exc, litellm.InternalServerError | litellm.ServiceUnavailableError):
        return f"{provider} had a server error answering with {model}: retry in a moment."
    if isinstance(exc, litellm.BadRequestError):
        return (
            f"{provider} refused the request to {model} as invalid: rephrase, or try another model."
        )
    return f"{model} failed ({type(exc).__name__}): retry, or pick another model."
