"""The API's refusals in OpenAI's shape: `{"error": {"message", "type", "code"}}`, with the status
and the headers the official SDKs read (`Retry-After`, `x-ratelimit-*`, `x-should-retry`)."""

from __future__ import annotations

import math
from datetime import UTC, datetime

from starlette.responses import JSONResponse

from vtai.metering.gate import QUOTA_REASONS, Grant

# A cap that lifts later than this is "hard": the SDKs are told not to retry it.
RETRY_WITHIN = 60.0

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


def limit_headers(grant: Grant | None) -> dict:
    """Retry-After and the x-ratelimit-* headers for a refusal at a cap."""
    if grant is None or grant.resets_at is None:
        return {"x-should-retry": "false"}
    wait = max((grant.resets_at - datetime.now(UTC)).total_seconds(), 0.0)
    headers = {
        "retry-after": str(math.ceil(wait)),
        "x-ratelimit-reset-tokens": duration(wait),
        "x-ratelimit-remaining-tokens": str(grant.remaining or 0),
    }
    if grant.reason == "rate_limited":
        headers["x-ratelimit-remaining-requests"] = "0"
        headers["x-ratelimit-reset-requests"] = duration(wait)
    if wait > RETRY_WITHIN:
        headers["x-should-retry"] = "false"
    return headers


def refusal(reason: str, message: str, grant: Grant | None) -> JSONResponse:
    status, kind, code = STATUS.get(reason, (400, "invalid_request_error", reason))
    headers = limit_headers(grant) if status == 429 else None
    if status == 503:
        headers = {"retry-after": "5"}
    return error(status, message, kind, code, headers)
