"""The benchmarks run, at tiny sizes, and count right. Timing is never asserted here."""

from __future__ import annotations

import argparse

import pytest

from benchmarks import common, gate_latency, gate_rules, ingest, memory, processes, turn_overhead


@pytest.fixture
async def bench_db(db_url):
    async with common.database(db_url) as url:
        yield url


async def test_gate_latency(bench_db):
    s = await gate_latency.bench(bench_db, [10, 200], turns=20, seed_turns=5, warmup=2)
    assert set(s.data["sizes"]) == {10, 200}
    assert all(d["turns"] == 20 for d in s.data["sizes"].values())
    # preload, then per size 2 x (2 warm-up + 20) gate turns (durable, fast) + (2 + 5) seed
    assert s.data["ledger_rows"] == 200 + 2 * 22 + 7
    assert s.data["counters_exact"] and s.data["reserved"] == 0
    assert "| history rows |" in s.markdown()


async def test_gate_rules(bench_db):
    s = await gate_rules.bench(bench_db, rows=100, turns=8, rounds=2, warmup=2)
    d = s.data
    assert set(d["configs"]) == {"off/durable", "on/durable", "off/fast", "on/fast"}
    assert all(c["turns"] == 8 for c in d["configs"].values())
    # preload, then per round and table row its warm-up turns (2 in the first round) + 4
    blocks = len(gate_rules.CONFIGS)
    assert d["ledger_rows"] == 100 + blocks * (2 + 4) + blocks * (gate_rules.BLOCK_WARMUP + 4)
    # The rules ran: the grant names the capped tier and the model's pattern weight.
    on, off = d["grants"]["on"], d["grants"]["off"]
    assert on["tier"] == gate_rules.RULES_TIER and on["weight"] == 0.5
    assert on["daily_limit"] and on["usd_limit"] and on["rpm"]
    assert off["weight"] == 1 and off["daily_limit"] is None and off["rpm"] is None
    assert d["daily_rows"] >= 1 and d["counters_exact"]
    assert d["reserved"] == 0 and d["cost_reserved"] == 0 and d["reservations"] == 0
    assert d["server"]["off"]["calls"] == d["server"]["on"]["calls"] == 8
    assert "| rules | commit |" in s.markdown()


async def test_turn_overhead(bench_db):
    s = await turn_overhead.bench(bench_db, [(1, 200), (3, 200)], turns=6, rounds=2)
    assert [d["turns"] for d in s.data["levels"].values()] == [6, 6]
    assert s.data["rows"] == s.data["metered_turns"] >= 24
    assert s.data["counters_exact"] and s.data["reserved"] == 0
    for d in s.data["levels"].values():
        assert d["bare_block_p50_min"] <= d["bare_block_p50_max"]
        lo, hi = d["paired_added_last_p50_min"], d["paired_added_last_p50_max"]
        assert lo <= d["paired_added_last_p50"] <= hi
    assert "from one block to the next" in s.markdown()


def test_block_spread_pairs_each_round_with_its_own_bare_block():
    blocks = {"bare": [4.0, 6.0, 5.0], "inline": [9.0, 9.0, 9.0], "ahead": [4.5, 7.0, 5.2]}
    d = turn_overhead.block_spread(blocks)
    assert (d["bare_block_p50_min"], d["bare_block_p50_max"]) == (4.0, 6.0)
    assert d["paired_added_last_p50"] == pytest.approx(0.5)
    assert d["paired_added_last_p50_min"] == pytest.approx(0.2)
    assert d["paired_added_last_p50_max"] == pytest.approx(1.0)


async def test_ingest(bench_db):
    s = await ingest.bench(
        bench_db, rows=50, batch_rows=120, batch=25, writers=3, users=7, in_flight=9
    )
    assert s.data["single"]["written"] == 50
    assert s.data["batch"]["written"] == s.data["app"]["written"] == 120
    assert s.data["rows_total"] == 290
    assert s.data["counters_exact"] and s.data["aggregates_exact"]
    assert s.data["reserved"] == 0 and s.data["reservations"] == 0


async def test_processes(bench_db):
    s = await processes.bench(bench_db, processes=2, users=4, limited=2, seconds=1)
    d = s.data
    assert d["turns"] > 0 and d["rows"] == d["turns"]
    assert d["overshoot"] == 0 and d["deadlocks"] == 0
    assert d["counters_exact"] and d["reserved"] == 0


async def test_memory(bench_db):
    # In this process rather than a fresh one (saves LiteLLM's import): RSS is not checked.
    data = await memory.worker(bench_db, sessions=2, max_tokens=2)
    assert data["answered"] == 3
    s = memory.section(data, sessions=2, max_tokens=2)
    assert len(s.rows) == len(data["rss"]) == 5


def test_turn_overhead_levels_are_parsed_or_refused_in_one_line():
    assert turn_overhead.parse_levels("1@25, 50@5") == [(1, 25.0), (50, 5.0)]
    for bad in ("50", "x@5", "50@0", "0@5"):
        with pytest.raises(argparse.ArgumentTypeError, match="USERS@TURNS_PER_SECOND"):
            turn_overhead.parse_levels(bad)
