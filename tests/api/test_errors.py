"""vtai.api.errors: OpenAI's error shape, status and rate-limit headers for each refusal."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from vtai.api import errors
from vtai.metering.gate import Grant


def body(response) -> dict:
    return json.loads(response.body)["error"]


def test_each_reason_has_its_status_and_type():
    assert errors.refusal("unavailable", "down", None).status_code == 503
    assert errors.refusal("model_not_offered", "no", None).status_code == 404
    assert body(errors.refusal("model_not_offered", "no", None))["code"] == "model_not_found"
    assert errors.refusal("model_not_allowed", "no", None).status_code == 403
    assert errors.refusal("price_unknown", "no", None).status_code == 403
    assert errors.refusal("message_too_long", "no", None).status_code == 400
    quota = errors.refusal("daily_exhausted", "spent", Grant(False, "daily_exhausted"))
    assert quota.status_code == 429 and body(quota)["type"] == "insufficient_quota"


def test_a_cap_that_lifts_later_tells_the_sdks_not_to_retry():
    later = Grant(
        False,
        "quota_exhausted",
        token_limit=100,
        used=100,
        resets_at=datetime.now(UTC) + timedelta(hours=2, minutes=3, seconds=4),
    )
    headers = errors.refusal("quota_exhausted", "spent", later).headers
    assert headers["x-should-retry"] == "false"
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    assert headers["x-ratelimit-limit-tokens"] == "100"
    assert headers["x-ratelimit-reset-tokens"] in ("2h3m4s", "2h3m3s")
    assert 7380 <= int(headers["retry-after"]) <= 7384
    soon = Grant(False, "rate_limited", rpm=5, resets_at=datetime.now(UTC) + timedelta(seconds=20))
    headers = errors.refusal("rate_limited", "slow down", soon).headers
    assert "x-should-retry" not in headers and headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-limit-requests"] == "5"
    assert headers["x-ratelimit-reset-requests"] in ("20s", "19s")
    assert "x-ratelimit-remaining-tokens" not in headers


def test_each_cap_reports_its_own_remainder_and_reset():
    """Not the period's allowance for every cap: what the cap that refused has left."""
    day_end = datetime.now(UTC) + timedelta(hours=3)
    period = dict(token_limit=1_000_000, used=10, reserved=0)
    daily = Grant(
        False, "prompt_exceeds_daily", daily_limit=500, daily_used=480, resets_at=day_end, **period
    )
    headers = errors.refusal(daily.reason, "today", daily).headers
    assert headers["x-ratelimit-remaining-tokens"] == "20"
    assert headers["x-ratelimit-limit-tokens"] == "500"
    assert headers["x-should-retry"] == "false"
    assert 10790 <= int(headers["retry-after"]) <= 10800
    spent = Grant(False, "daily_exhausted", daily_limit=500, daily_used=400, resets_at=day_end)
    headers = errors.refusal(spent.reason, "today", spent).headers
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    for reason, left in (("usd_exhausted", "0"), ("prompt_exceeds_usd", "0.25")):
        usd = Grant(False, reason, usd_limit=1.5, usd_used=1.25, resets_at=day_end, **period)
        headers = errors.refusal(reason, "dollars", usd).headers
        assert headers["x-ratelimit-remaining-tokens"] == "0"
        assert "x-ratelimit-limit-tokens" not in headers
        assert (headers["x-vtai-limit-usd"], headers["x-vtai-remaining-usd"]) == ("1.5", left)
        assert headers["x-should-retry"] == "false"
    tight = Grant(False, "prompt_exceeds_quota", token_limit=100, used=60, reserved=15,
                  resets_at=day_end)  # fmt: skip
    assert (
        errors.refusal(tight.reason, "tokens", tight).headers["x-ratelimit-remaining-tokens"]
        == "25"
    )
    # A cap that refuses a minute before it lifts is still a spent quota: not retried.
    soon = Grant(False, "daily_exhausted", daily_limit=5, resets_at=datetime.now(UTC))
    assert errors.refusal(soon.reason, "today", soon).headers["x-should-retry"] == "false"


def test_durations_read_as_openai_writes_them():
    assert errors.duration(0) == "0s"
    assert errors.duration(59.2) == "1m0s"
    assert errors.duration(360) == "6m0s"
    assert errors.duration(3600 + 62) == "1h1m2s"
