"""The operator's model catalogue: seeded with the built-in list, read by the app, cached."""

from __future__ import annotations

import logging

import pytest

from vtai.llm import catalogue, models, tokens
from vtai.llm.catalogue import Catalogue
from vtai.llm.models import BUILTIN_MODELS, LOCAL_MODEL_ID, PROVIDER_MODELS, ModelEntry


async def test_seeded_catalogue_is_the_built_in_list(conn):
    entries = await catalogue.read(conn)
    strip = [
        (e.model, e.provider_key, e.api_base, e.api_key_env, e.price_in, e.price_out, e.weight)
        for e in entries
    ]
    assert strip == [
        (e.model, e.provider_key, e.api_base, e.api_key_env, e.price_in, e.price_out, e.weight)
        for e in BUILTIN_MODELS
    ]
    assert all(e.enabled for e in entries)
    assert [e.model for e in entries if e.provider_key is None] == [LOCAL_MODEL_ID]
    # The local model's price is a known 0.
    assert (entries[0].price_in, entries[0].price_out) == (0.0, 0.0)
    # Offered exactly as before the catalogue, for every set of keys.
    for var in PROVIDER_MODELS:
        env = {var: "a-key"}
        assert models.available_models("gpt-4o", env, entries=entries) == models.available_models(
            "gpt-4o", env
        )
        assert models.available_models("gpt-4o", env) == list(
            dict.fromkeys(["gpt-4o", LOCAL_MODEL_ID, *PROVIDER_MODELS[var]])
        )


def test_offered_models_and_why_not():
    entries = [
        ModelEntry(LOCAL_MODEL_ID),
        ModelEntry("gpt-4o", provider_key="OPENAI_API_KEY"),
        ModelEntry("openai/mine", api_base="http://h/v1", api_key_env="MINE_KEY"),
        ModelEntry("openai/off", api_base="http://h/v1", api_key_env="MINE_KEY", enabled=False),
    ]
    env = {"MINE_KEY": "k"}
    assert models.available_models("x/default", env, entries=entries) == [
        "x/default",
        LOCAL_MODEL_ID,
        "openai/mine",
    ]
    assert models.unavailable_reason(entries[1], env) == "OPENAI_API_KEY is not set"
    assert models.unavailable_reason(entries[2], {}) == "MINE_KEY is not set"
    assert models.unavailable_reason(entries[3], env).startswith("disabled")
    assert models.call_options(entries[2], env) == {"api_base": "http://h/v1", "api_key": "k"}
    assert models.call_options(entries[1], env) == {}


def test_catalogue_price_wins_over_litellm():
    known = tokens.cost("gpt-4o-mini", 1000, 500)
    assert known and known > 0
    try:
        models.set_catalogue_prices(
            [ModelEntry("gpt-4o-mini", price_in=1e-3, price_out=2e-3), ModelEntry("a/b")]
        )
        assert tokens.cost("gpt-4o-mini", 1000, 500) == pytest.approx(2.0)
        assert models.catalogue_price("a/b") is None
    finally:
        models.set_catalogue_prices([])
    assert tokens.cost("gpt-4o-mini", 1000, 500) == known


async def test_catalogue_is_cached_and_read_again_when_due(db_url, conn):
    import asyncpg

    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=1)
    try:
        cat = Catalogue(pool, refresh=3600)
        assert [e.model for e in await cat.fresh()] == [e.model for e in BUILTIN_MODELS]
        await conn.execute("update models set enabled = false where model = 'gpt-4o'")
        assert cat.get("gpt-4o").enabled  # the process's copy, until it is due
        cat.refresh_after = 0
        await cat.fresh()
        assert not cat.get("gpt-4o").enabled
        # A change heard from the database (vtai.metering.plan_watch) expires the copy at once.
        cat.refresh_after = 3600
        await conn.execute("update models set enabled = true where model = 'gpt-4o'")
        cat.expire()
        await cat.fresh()
        assert cat.get("gpt-4o").enabled
    finally:
        await pool.close()


async def test_without_a_pool_the_built_in_list_is_offered_and_said_once(caplog):
    with caplog.at_level(logging.WARNING):
        cat = Catalogue(None)
        await cat.fresh()
        await cat.fresh()
    assert cat.entries == BUILTIN_MODELS
    said = [r for r in caplog.records if "built-in list" in r.getMessage()]
    assert len(said) == 1


async def test_a_failing_read_keeps_the_list_and_says_so_once(caplog):
    class Broken:
        async def fetch(self, *a):
            raise OSError("down")

    cat = Catalogue(Broken(), refresh=0)
    with caplog.at_level(logging.WARNING):
        await cat.fresh()
        await cat.fresh()
    assert cat.entries == BUILTIN_MODELS
    assert len([r for r in caplog.records if "catalogue failed" in r.getMessage()]) == 1


def test_weight_patterns_are_shell_style_and_star_crosses_slashes():
    names = ["gpt-4o-mini", "openrouter/a/b", "openrouter/c", "openrouter/a/b-mini"]
    assert catalogue.matching("openrouter/*", names) == names[1:]
    assert catalogue.matching("*mini", names) == ["gpt-4o-mini", "openrouter/a/b-mini"]
    assert catalogue.matching("gpt-4o-min?", names) == ["gpt-4o-mini"]
    assert catalogue.matching("nothing*", names) == []
