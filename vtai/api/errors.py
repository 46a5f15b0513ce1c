"""The API's refusals in OpenAI's shape: `{"error": {"message", "type", "code"}}`, with the status
and the headers the official SDKs read (`Retry-After`, `x-ratelimit-*`, `x-should-retry`)."""

from __future__ import annotations

import math
from datetime import UTC, datetime

from starlette.responses import JSONResponse

from vtai.metering.gate import QUOTA_REASONS, Grant

DAILY_REASONS = frozenset({"daily_exhausted", "prompt_exceeds_daily"})
USD_REASONS = frozenset({"usd_exhausted", "prompt_exceeds_usd"})

# A refused turn's reason -> (status, OpenAI error type, code).
STATUS = {
    "model_not_offered": (404, "invalid_request_error", "model_not_found"),
    "model_not_allowed": (403, "permission_error", "model_not_allowed"),
    "price_unknown": (403, "permission_error", "model_not_priced"),
    "rate_limited": (429, "rate_limit_error", "rate_limit_exceeded"),
    "message_too_long": (400, "invalid_request_error", "message_too_long"),
    "context_exceeded": (400, "invalid_request_error", "context_length_exceeded"),
    "unavailable": (503, "api_error", "usage_service_unavailable"),
    "unknown_user": (401, "authentication_error", "invalid_api_key"),
    "error": (500, "api_error", "internal_error"),
    **{reason: (429, "insufficient_quota", reason) for reason in QUOTA_REASONS},
}


def error(
    status: int, message: str, kind: str, code: str | None = None, headers: dict | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": code}},
        status_code=status,
        headers=headers,
    )


def duration(seconds: float) -> str:
    """OpenAI's reset format: `6m0s`, `1s`, `2h3m4s`."""
    seconds = max(0, math.ceil(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{minutes}m{secs}s" if minutes or hours else f"{secs}s"
    return f"{hours}h{text}" if hours else text


def _tokens_left(grant: Grant) -> tuple[int | None, int]:
    """(the refusing cap's limit, counted tokens it has left) for a token or dollar refusal.

    The grant of a refusal carries each counter's used tokens but today's reservations only
    in the refusal itself: a spent cap is 0 left, a prompt too big for one is what its used
    tokens leave (at most that, turns in flight hold some of it)."""
    reason = grant.reason
    if reason in DAILY_REASONS:
        if reason == "daily_exhausted" or grant.daily_limit is None:
            return grant.daily_limit, 0
        return grant.daily_limit, max(grant.daily_limit - grant.daily_used, 0)
    if reason in USD_REASONS:
        # Dollars, not tokens, refused: no token allowance is left to spend on this model.
        return None, 0
    if reason == "quota_exhausted":
        return grant.token_limit, 0
    return grant.token_limit, grant.remaining or 0


def _usd(amount: float) -> str:
    """Dollars as the ledger keeps them, to 8 decimals, without trailing zeros."""
    return f"{amount:.8f}".rstrip("0").rstrip(".")


def limit_headers(grant: Grant | None) -> dict:
    """Retry-After and the x-ratelimit-* headers of the cap that refused (docs/api.md lists
    them per cap). The reset is the grant's `resets_at`, which vtai_reserve() sets to the
    refusing cap's own: the period's end, the day's end or the minute's end."""
    if grant is None or grant.resets_at is None:
        return {"x-should-retry": "false"}
    wait = max((grant.resets_at - datetime.now(UTC)).total_seconds(), 0.0)
    headers = {"retry-after": str(math.ceil(wait))}
    if grant.reason == "rate_limited":
        # Lifts within the minute: the SDKs retry it, after Retry-After.
        headers["x-ratelimit-remaining-requests"] = "0"
        headers["x-ratelimit-reset-requests"] = duration(wait)
        if grant.rpm is not None:
            headers["x-ratelimit-limit-requests"] = str(grant.rpm)
        return headers
    limit, left = _tokens_left(grant)
    headers["x-ratelimit-remaining-tokens"] = str(left)
    headers["x-ratelimit-reset-tokens"] = duration(wait)
    if limit is not None:
        headers["x-ratelimit-limit-tokens"] = str(limit)
    if grant.reason in USD_REASONS and grant.usd_limit is not None:
        spent = grant.reason == "usd_exhausted"
        usd_left = 0.0 if spent else max(grant.usd_limit - grant.usd_used, 0.0)
        headers["x-vtai-limit-usd"] = _usd(grant.usd_limit)
        headers["x-vtai-remaining-usd"] = _usd(usd_left)
    if grant.reason in QUOTA_REASONS:
        # A spent quota lifts at the period's or the day's end: retrying now only adds rows.
        headers["x-should-retry"] = "false"
    return headers


def refusal(reason: str, message: str, grant: Grant | None) -> JSONResponse:
    status, kind, code = STATUS.get(reason, (400, "invalid_request_error", reason))
    headers = limit_headers(grant) if status == 429 else None
    if status == 503:
        headers = {"retry-after": "5"}
    return error(status, message, kind, code, headers)
