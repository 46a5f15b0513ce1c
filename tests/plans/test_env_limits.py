"""VTAI_LIMIT_* at start-up (vtai.db.connection.sync_tiers): set, it overrides the tier's token
limit, says so in the log and audits a change; unset, an edit made since survives a restart."""

from __future__ import annotations

import logging

from tests.conftest import make_settings
from vtai.db.connection import Database
from vtai.plans import tiers


async def restart(db_url, tmp_path, **limits) -> None:
    """What the app (or any `vtai` command) does at start-up: migrate, sync the tiers."""
    settings = make_settings(db_url, tmp_path, tier_limits=limits)
    db = await Database(settings, pool_size=2).open()
    await db.close()


async def free_plan(conn):
    return {p.name: p for p in await tiers.read(conn)}["free"]


async def env_rows(conn):
    return await conn.fetch(
        "select actor, before::text as before, after::text as after from audit_log"
        " where actor like 'env:%' order by id"
    )


async def test_an_edit_survives_a_restart_without_the_variable(conn, db_url, tmp_path, caplog):
    edit = tiers.parse_changes({"tokens": "20000", "daily": "2000"})
    await tiers.save(conn, "free", edit, "cli:ops")
    with caplog.at_level(logging.INFO, logger="vtai.db.connection"):
        await restart(db_url, tmp_path)
    plan = await free_plan(conn)
    assert (plan.token_limit, plan.daily_limit) == (20000, 2000)
    assert "VTAI_LIMIT" not in caplog.text and await env_rows(conn) == []


async def test_the_variable_overrides_at_start_up_and_says_so(conn, db_url, tmp_path, caplog):
    await tiers.save(conn, "free", tiers.parse_changes({"tokens": "20000", "rpm": "5"}), "cli:ops")
    with caplog.at_level(logging.INFO, logger="vtai.db.connection"):
        await restart(db_url, tmp_path, free=15000)
    plan = await free_plan(conn)
    assert (plan.token_limit, plan.rpm) == (15000, 5)  # only the token limit is the variable's
    said = [r for r in caplog.records if "VTAI_LIMIT_FREE" in r.getMessage()]
    assert [r.getMessage() for r in said] == [
        "VTAI_LIMIT_FREE=15000 overrides the free tier's token limit (was 20000)"
    ]
    assert said[0].levelno == logging.WARNING
    rows = await env_rows(conn)
    assert [(r["actor"], r["before"], r["after"]) for r in rows] == [
        ("env:VTAI_LIMIT_FREE", '{"token_limit": 20000}', '{"token_limit": 15000}')
    ]

    # Again with the same value: said, but nothing changed, so no audit row.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vtai.db.connection"):
        await restart(db_url, tmp_path, free=15000)
    assert "VTAI_LIMIT_FREE=15000 sets the free tier's token limit (unchanged)" in caplog.text
    assert len(await env_rows(conn)) == 1

    # Unset again: the tier keeps the last value, edits from now on stick.
    await tiers.save(conn, "free", tiers.parse_changes({"tokens": "30000"}), "cli:ops")
    await restart(db_url, tmp_path)
    assert (await free_plan(conn)).token_limit == 30000


async def test_a_variable_seeds_a_fresh_database(conn, db_url, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="vtai.db.connection"):
        await restart(db_url, tmp_path, premium=750000, basic=100000)
    plans = {p.name: p.token_limit for p in await tiers.read(conn)}
    assert plans == {"free": 10000, "basic": 100000, "premium": 750000, "unlimited": None}
    assert "VTAI_LIMIT_PREMIUM=750000 overrides the premium tier's token limit (was 500000)" in (
        caplog.text
    )
    assert "VTAI_LIMIT_BASIC=100000 sets the basic tier's token limit (unchanged)" in caplog.text
    assert [r["actor"] for r in await env_rows(conn)] == ["env:VTAI_LIMIT_PREMIUM"]
