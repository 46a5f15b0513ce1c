"""vtai.ui.quota and vtai.metering.refusal: the words for every cap of a plan."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from types import SimpleNamespace

from vtai.metering.gate import Grant, Usage
from vtai.metering.refusal import refusal, short_answer
from vtai.ui import quota

MONTH_END = datetime(2027, 1, 1, tzinfo=UTC)
TOMORROW = datetime(2026, 12, 6, tzinfo=UTC)


def usage(**caps) -> Usage:
    return Usage(
        "ana", "free", 10_000, 2_500, 0, datetime(2026, 12, 1, tzinfo=UTC), MONTH_END, **caps
    )


def test_a_default_plan_reads_as_before():
    assert quota.describe_usage(usage()) == quota.describe("free", 2_500, 10_000, MONTH_END)


def test_every_cap_that_applies_is_on_the_line_with_the_weight():
    line = quota.describe_usage(
        usage(daily_limit=2_000, daily_used=1_500, usd_limit=1.5, usd_used=0.25), weight=10
    )
    assert "2,500 / 10,000 tokens used" in line
    assert "today 1,500 / 2,000 (500 left)" in line
    assert "$0.25 / $1.50 spent" in line
    assert line.endswith("this model counts 10× against your quota")
    assert "free: it doesn't count" in quota.describe_usage(usage(), weight=0)


def test_each_refusal_names_its_cap_and_when_it_resets():
    base = dict(tier="free", token_limit=10_000, used=10_000)
    period = refusal(Grant(False, "quota_exhausted", resets_at=MONTH_END, **base), "month", "m")
    assert period.startswith("You have used your token quota. 10,000 of 10,000 tokens")
    assert "resets 2027-01-01 00:00 UTC" in period
    daily = refusal(
        Grant(False, "daily_exhausted", resets_at=TOMORROW, daily_limit=2_000, daily_used=2_000),
        "month",
        "m",
    )
    assert daily.startswith("You have used today's token quota. 2,000 of 2,000 tokens used today")
    assert "resets 2026-12-06 00:00 UTC" in daily
    dollars = refusal(
        Grant(False, "usd_exhausted", tier="free", usd_limit=1.5, usd_used=1.5), "month", "m"
    )
    assert "You have used your dollar quota. $1.50 of $1.50 spent this month" in dollars
    rate = refusal(
        Grant(False, "rate_limited", tier="free", rpm=10, resets_at=TOMORROW), "month", "m"
    )
    assert rate == (
        "That is 10 requests this minute, the most the free plan allows: try again at 00:00:00 UTC."
    )
    model = refusal(Grant(False, "model_not_allowed", tier="free"), "month", "gpt-4o")
    assert model.startswith("The free plan doesn't include gpt-4o")
    price = refusal(Grant(False, "price_unknown", tier="free"), "month", "openai/x")
    assert "openai/x has no known price" in price


def test_the_short_answer_offer_says_how_short():
    grant = Grant(
        True, "granted", max_tokens=20, tier="free", token_limit=300, used=250, resets_at=MONTH_END
    )
    text = short_answer(grant, "month")
    assert text.startswith("Only about 20 tokens of answer are left within your quota")
    assert "250 of 300 tokens used this month" in text


def test_a_top_up_shows_on_the_line_with_its_earliest_expiry():
    until = datetime(2026, 12, 31, tzinfo=UTC)
    base = usage()
    # Usage gains topup_left/topup_until with top-ups (vtai.metering.gate); either way the line
    # reads them by name.
    topped = (
        replace(base, topup_left=50_000, topup_until=until)
        if hasattr(base, "topup_left")
        else SimpleNamespace(**vars(base), topup_left=50_000, topup_until=until)
    )
    line = quota.describe_usage(topped)
    assert line.startswith(quota.describe("free", 2_500, 10_000, MONTH_END))
    assert " · + 50,000 top-up until 2026-12-31" in line
    assert "top-up" not in quota.describe_usage(base)


def test_with_billing_the_refusal_offers_plans_instead_of_the_administrator():
    from vtai.ui import chat

    grant = Grant(False, "quota_exhausted", tier="free", token_limit=300, used=300)
    text = refusal(grant, "month", "m")
    assert chat.ADMIN_HINT in text
    offered = chat.with_upgrade_hint(text)
    assert chat.ADMIN_HINT not in offered and offered.endswith(chat.UPGRADE_HINT)


async def test_with_billing_off_the_chat_offers_no_plan(monkeypatch, tmp_path):
    from vtai.settings import Settings
    from vtai.ui import chat

    off = Settings(data_dir=tmp_path, database_url="postgresql://nowhere/none")
    monkeypatch.setattr(chat, "_services", SimpleNamespace(settings=off, db=object()))
    assert not off.billing
    assert await chat._billing_actions("quota_exhausted") == []
