"""Plans (vtai.plans.tiers): parsing each field, saving one tier with its audit row, atomically."""

from __future__ import annotations

import json
from decimal import Decimal

import asyncpg
import pytest

from vtai.llm import catalogue
from vtai.plans import tiers
from vtai.plans.tiers import PlanError


@pytest.mark.parametrize(
    ("field", "text", "expected"),
    [
        ("tokens", "20000", 20000),
        ("tokens", "1_000", 1000),
        ("daily", "none", None),
        ("daily", " None ", None),
        ("daily", "", None),
        ("daily", "0", 0),
        ("rpm", "10", 10),
        ("usd", "1.50", Decimal("1.50")),
        ("usd", "$2", Decimal(2)),
        ("usd", "0.00000001", Decimal("0.00000001")),
        ("usd", "none", None),
        ("models", "local/*, gpt-4o-mini,", ("local/*", "gpt-4o-mini")),
        ("models", "*,*", ("*",)),
    ],
)
def test_parse_accepts(field, text, expected):
    assert tiers.parse_changes({field: text}, "--") == {tiers.FIELDS[field]: expected}


@pytest.mark.parametrize(
    ("field", "text", "says"),
    [
        ("tokens", "-1", "--tokens: -1 is negative"),
        ("daily", "-5", "--daily: -5 is negative"),
        ("daily", "2k", "--daily: '2k' is not a whole number"),
        ("rpm", "1.5", "--rpm: '1.5' is not a whole number"),
        ("rpm", str(2**31), "--rpm: 2147483648 is above the maximum"),
        ("tokens", str(2**63), "--tokens: 9223372036854775808 is above the maximum"),
        ("usd", "-0.01", "--usd: -0.01 is negative"),
        ("usd", "cheap", "--usd: 'cheap' is not an amount in US dollars"),
        ("usd", "nan", "--usd: 'nan' is not an amount"),
        ("usd", "inf", "--usd: 'inf' is not an amount"),
        ("usd", "0.000000001", "--usd: 0.000000001 has more than 8 decimal places"),
        ("usd", "1e20", "--usd: 1e20 is above the maximum"),
        ("models", "", "--models: name at least one model"),
        ("models", " , ", "--models: name at least one model"),
        ("models", "gpt 4o", "--models: 'gpt 4o' has a space"),
        ("models", "x" * 201, "--models: 'xxxx"),
        ("models", ",".join(f"m{i}" for i in range(201)), "--models: at most 200 patterns"),
    ],
)
def test_bad_input_is_one_line_naming_the_field(field, text, says):
    with pytest.raises(PlanError) as caught:
        tiers.parse_changes({field: text}, "--")
    assert str(caught.value).startswith(says) and "\n" not in str(caught.value)


async def test_matching_agrees_with_the_databases_glob(conn):
    names = [
        "gpt-4o",
        "gpt-4o-mini",
        "openrouter/openai/gpt-4o-mini",
        "local/smollm2-135m",
        "a[b]c",
        "ab",
        "100%_sure",
        "100xxsure",
        "back\\slash",
        "multi\nline",
    ]
    patterns = ["*", "gpt-4o*", "*mini", "gpt-4o-min?", "openrouter/*", "a[b]c", "[ab]", "?b"]
    patterns += ["100%_sure", "100?_sure", "back\\slash", "back\\*", "multi*", "*/*/*", "", "?"]
    for pattern in patterns:
        in_sql = await conn.fetch(
            "select n from unnest($1::text[]) n where n like public.vtai_glob_like($2) order by n",
            names,
            pattern,
        )
        assert sorted(catalogue.matching(pattern, names)) == [r["n"] for r in in_sql], pattern


async def read_audit(conn) -> list[dict]:
    rows = await conn.fetch(
        "select actor, action, target, before::text as b, after::text as a"
        " from audit_log order by id"
    )
    return [
        {
            "actor": r["actor"],
            "action": r["action"],
            "target": r["target"],
            "before": json.loads(r["b"]) if r["b"] else None,
            "after": json.loads(r["a"]) if r["a"] else None,
        }
        for r in rows
    ]


async def test_defaults_keep_todays_behaviour(conn):
    plans = {p.name: p for p in await tiers.read(conn)}
    assert list(plans) == ["free", "basic", "premium", "unlimited"]
    assert [plans[t].token_limit for t in plans] == [10000, 100000, 500000, None]
    for p in plans.values():
        assert (p.daily_limit, p.usd_limit, p.rpm, p.models) == (None, None, None, ("*",))


async def test_save_changes_the_tier_and_audits_only_what_changed(conn):
    changes = tiers.parse_changes(
        {
            "tokens": "20000",
            "daily": "2000",
            "usd": "1.50",
            "rpm": "10",
            "models": "local/*,gpt-4o-mini",
        }
    )
    saved = await tiers.save(conn, "free", changes, "cli:ops")
    assert saved.changed and saved.warnings == []
    row = await conn.fetchrow("select * from tiers where name = 'free'")
    assert (row["token_limit"], row["daily_limit"], row["usd_limit"], row["rpm"]) == (
        20000,
        2000,
        Decimal("1.5"),
        10,
    )
    assert row["models"] == ["local/*", "gpt-4o-mini"]
    assert await read_audit(conn) == [
        {
            "actor": "cli:ops",
            "action": "tier.set",
            "target": "free",
            "before": {
                "token_limit": 10000,
                "daily_limit": None,
                "usd_limit": None,
                "rpm": None,
                "models": ["*"],
            },
            "after": {
                "token_limit": 20000,
                "daily_limit": 2000,
                "usd_limit": "1.50",
                "rpm": 10,
                "models": ["local/*", "gpt-4o-mini"],
            },
        }
    ]

    # Clearing one cap: only that column is in the next row.
    saved = await tiers.save(conn, "free", tiers.parse_changes({"daily": "none"}), "cli:ops")
    assert saved.after.daily_limit is None and saved.after.rpm == 10
    assert (await read_audit(conn))[-1]["before"] == {"daily_limit": 2000}
    assert (await read_audit(conn))[-1]["after"] == {"daily_limit": None}

    # The same values again: no change, no row.
    again = tiers.parse_changes({"tokens": "20000", "usd": "1.5", "models": "local/*, gpt-4o-mini"})
    assert not (await tiers.save(conn, "free", again, "cli:ops")).changed
    assert len(await read_audit(conn)) == 2


async def test_unknown_tier_names_the_field_and_changes_nothing(conn):
    with pytest.raises(PlanError) as caught:
        await tiers.save(conn, "gold", {"rpm": 5}, "cli:ops", tier_field="tier")
    assert str(caught.value) == (
        "tier: unknown tier 'gold': choose one of free, basic, premium, unlimited"
    )
    assert await read_audit(conn) == []


async def test_a_pattern_matching_no_model_is_a_warning_and_is_saved(conn):
    changes = tiers.parse_changes({"models": "local/*,nothing/*"})
    saved = await tiers.save(conn, "basic", changes, "cli:ops")
    assert saved.after.models == ("local/*", "nothing/*")
    assert saved.warnings == [
        "--models: 'nothing/*' matches no model in the catalogue (vtai model list)"
    ]


async def test_the_change_and_its_audit_row_commit_together(conn):
    # An actor the audit table refuses (empty): the tier's change is rolled back with it.
    with pytest.raises(asyncpg.CheckViolationError):
        await tiers.save(conn, "premium", {"rpm": 3}, "")
    assert await conn.fetchval("select rpm from tiers where name = 'premium'") is None
    assert await read_audit(conn) == []


def test_env_override_warns_only_when_the_variable_will_put_it_back():
    limits = {"free": 15000}
    assert tiers.env_override("free", {"token_limit": 20000}, limits).startswith(
        "VTAI_LIMIT_FREE=15000 is set: the next start-up puts the free tier's token limit back"
    )
    assert tiers.env_override("free", {"token_limit": 15000}, limits) is None
    assert tiers.env_override("free", {"rpm": 3}, limits) is None
    assert tiers.env_override("basic", {"token_limit": 1}, limits) is None
