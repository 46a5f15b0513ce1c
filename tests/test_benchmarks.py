"""The benchmarks run, at tiny sizes, and count right. Timing is never asserted here."""

from __future__ import annotations

import argparse

import pytest

from benchmarks import (
    admin_scale,
    api_vs_proxy,
    common,
    gate_latency,
    gate_rules,
    ingest,
    memory,
    mock_provider,
    processes,
    run_all,
    socket_load,
    turn_overhead,
)


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
async def test_api_vs_proxy_on_the_vtai_side(bench_db):
    """The real app's /v1 and the mock provider, each in its own process, driven as the full
    run drives them; LiteLLM's proxy (its own venv, `make bench-proxy-venv`) is left out."""
    levels = [(0.0, 0.0), (50.0, 1.0)]
    s = await api_vs_proxy.bench(
        bench_db, levels, requests=6, clients=3, seconds=1.0, chunks=5, rounds=2, warmup=2,
        vtai_only=True,
    )  # fmt: skip
    d = s.data
    assert d["errors"] == 0, s.notes[-1]
    assert list(d["levels"]) == [
        "one at a time, tokens back to back",
        "50 req/s, a token every 1 ms",
    ]
    for level in d["levels"].values():
        assert set(level) == {"direct", "vtai"}
        assert level["direct"]["requests"] == level["vtai"]["requests"] == 6
        assert 0 < level["vtai"]["first_p50"] <= level["vtai"]["last_p50"]
        assert level["vtai"]["cpu_per_request"] > 0
    assert d["saturation"]["vtai"]["requests"] > 0 and d["saturation"]["direct"]["requests"] > 0
    # Every /v1 request was metered: one ledger row each, counters exact, nothing held.
    assert d["vtai_rows"] == d["vtai_requests"] == d["vtai_rows_by_source"]["api"]
    assert d["counters_exact"] and d["reserved"] == 0
    assert d["proxy_unavailable"] == "not run (--vtai-only)" and not s.targets
    assert "| one at a time, tokens back to back | VT.ai /v1 |" in s.markdown()
    assert s.command.endswith("--vtai-only")


def test_api_vs_proxy_levels_are_parsed_or_refused_in_one_line():
    assert api_vs_proxy.parse_levels("0@0, 10@2,5") == [(0.0, 0.0), (10.0, 2.0), (5.0, 0.0)]
    for bad in ("x@1", "-1@0", "1@-2"):
        with pytest.raises(argparse.ArgumentTypeError, match="RATE@GAP_MS"):
            api_vs_proxy.parse_levels(bad)


def test_the_mock_takes_its_pause_between_tokens_from_the_prompt():
    tagged = {"messages": [{"role": "user", "content": "hi (abc [gap 2.5])"}]}
    assert mock_provider.gap_of(tagged, 0.0) == 0.0025
    assert mock_provider.gap_of({"messages": [{"role": "user", "content": "hi"}]}, 0.1) == 0.1
    assert "".join(mock_provider.answer(3)) == "Sure w1 w2"


def test_api_vs_proxy_targets_compare_what_each_side_adds_over_direct():
    def block(first: float, last: float) -> api_vs_proxy.Block:
        return api_vs_proxy.Block(first=[first] * 10, last=[last] * 10, seconds=1.0, cpu=0.1)

    levels = {"one at a time, tokens back to back": {
        "direct": block(0.001, 0.002), "proxy": block(0.011, 0.022), "vtai": block(0.006, 0.032),
    }}  # fmt: skip
    saturated = {name: block(0.1, 0.2) for name in ("direct", "proxy", "vtai")}
    data = {"vtai_only": False, "clients": 4, "seconds": 1.0, "rounds": 1, "chunks": 5}
    data |= {"level_spec": [(0.0, 0.0)], "requests": 10, "vtai_rows": 0, "vtai_requests": 0}
    data |= {"counters_exact": True, "reserved": 0}
    s = api_vs_proxy.summarize(levels, saturated, data)
    met = {t.what.split(",")[0]: t.met for t in s.targets}
    # first token: VT.ai adds 5 ms, the proxy 10 ms; last token: VT.ai 30 ms, the proxy 20 ms
    assert met == {
        "added p50 to the first token": True,
        "added p99 to the first token": True,
        "added p50 to the last token": False,
        "added p99 to the last token": False,
    }
    assert "(0.50x)" in s.targets[0].measured and "(1.50x)" in s.targets[2].measured


def test_run_all_merge_replaces_one_section_and_its_target_rows():
    old = run_all.document(
        {"cpu": "x"},
        "python benchmarks/run_all.py",
        [
            (_section("A", met=True), "load a"),
            (_section("B", met=False), "load b"),
        ],
    )
    new = run_all.merge(old, "python benchmarks/run_all.py --only b --merge", [
        (_section("B", met=True, cell="9"), "load b2"),
        (_section("C", met=True), "load c"),
    ])  # fmt: skip
    assert new.count("## B") == 1 and "| 9 |" in new and "_load b2; merged in" in new
    assert "| B | t | goal | m | yes |" in new and "| B | t | goal | m | **no** |" not in new
    assert "| A | t | goal | m | yes |" in new and "_load a._" in new
    # A new section goes before the design notes, its target rows after the others.
    assert new.index("## C") < new.index(run_all.DESIGN.splitlines()[0])
    rows = [line[:5] for line in new.splitlines() if line[:5] in ("| A |", "| B |", "| C |")]
    assert rows == ["| A |", "| B |", "| C |"]


def _section(title: str, met: bool, cell: str = "1") -> common.Section:
    target = common.Target("t", "goal", "m", met, "why")
    return common.Section(title, f"cmd {title}", ["col"], [[cell]], ["a note"], [target])


@pytest.mark.slow
async def test_socket_load_drives_vtai_and_the_bare_app_over_socketio(bench_db):
    """Both Chainlit servers in their own processes, chats over socket.io, on one process and
    on two behind real HAProxy; the provider is the mock (a stand-in for a remote model)."""
    s = await socket_load.bench(
        bench_db, [(2, 0.3)], seconds=1.0, saturation_chats=4, saturation_seconds=1.0,
        processes=2, chunks=3, gap_ms=1, latency_ms=5,
    )  # fmt: skip
    d = s.data
    for side in socket_load.SIDES:
        # (2 processes: behind HAProxy, each chat on the process its sticky cookie names)
        for where in (d["levels"]["2@0.3"], d["saturation"]["1"], d["saturation"]["2"]):
            assert where[side]["errors"] == 0 and where[side]["turns"] > 0, where[side]
            assert 0 < where[side]["first_p50"] <= where[side]["last_p50"]
    # Every VT.ai turn (warm-up turns aside) is one ledger row; nothing left reserved.
    assert d["rows"] >= d["vtai_turns"] and d["counters_exact"] and d["reserved"] == 0
    assert "| 2 chats, a message every ~0.3 s | VT.ai |" in s.markdown()


@pytest.mark.slow
async def test_admin_scale_answers_every_route_on_a_small_seed(bench_db):
    s = await admin_scale.bench(
        bench_db, rows=400, users=6, days=3, export_rows=100, requests=2, concurrency=2,
        progress=lambda _line: None, cli_runs=1,
    )  # fmt: skip
    d = s.data
    assert d["rows"] == 400 and d["aggregates"] > 0
    assert all(r["errors"] == 0 and r["requests"] == 2 for r in d["routes"].values()), d
    assert 0 < d["export"]["rows"] <= 400 and d["usage_chat"]["errors"] == 0
    # Seeding again finds the seed and loads nothing.
    assert (await admin_scale.seed(bench_db, 400, 6, 3, lambda _line: None))["rows"] == 400
