"""The metric functions the turn, ledger and spool call: they never raise, they bound their
label values, and with PROMETHEUS_MULTIPROC_DIR processes add up in one scrape."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT
from vtai.ops import metrics

TURN = """
from types import SimpleNamespace as N
from vtai.ops import metrics
metrics.turn_ended(N(model="m1", source="api"), N(kind="answered", grant=None, reason=None))
metrics.rows_landed([{"status": "success", "model": "m1", "prompt_tokens": 5,
                      "completion_tokens": 7, "total_cost": 0.25}], [True])
"""
SCRAPE = """
import sys
from vtai.ops import metrics
sys.stdout.write(metrics._render().decode())
"""


def run(code: str, multiproc_dir) -> str:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_two_processes_add_up_in_one_scrape(tmp_path):
    turns = [
        asyncio.to_thread(run, TURN, tmp_path),
        asyncio.to_thread(run, TURN, tmp_path),
    ]

    async def both():
        await asyncio.gather(*turns)

    asyncio.run(both())
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(run(SCRAPE, tmp_path))
        for s in family.samples
    }
    turn = (("model", "m1"), ("source", "api"), ("status", "answered"))
    assert samples[("vtai_turns_total", turn)] == 2
    assert samples[("vtai_tokens_total", (("kind", "completion"), ("model", "m1")))] == 14
    assert samples[("vtai_cost_usd_total", (("model", "m1"),))] == 0.5


def test_a_failing_metric_never_reaches_the_caller():
    metrics.turn_ended(None, None)
    metrics.rows_landed([None], [True])
    metrics.provider_error(None, ValueError("x"))
    with pytest.raises(KeyError), metrics.ledger_batch(3):
        raise KeyError("the write's own error goes on up")
    errors = metrics.LEDGER_BATCH_SECONDS.labels("error")._sum.get()
    assert errors > 0


async def test_the_gate_is_timed_and_its_errors_pass_through():
    before = metrics.GATE_SECONDS._sum.get()

    async def reserve():
        await asyncio.sleep(0.01)
        raise ConnectionError("the database went away")

    with pytest.raises(ConnectionError):
        await metrics.timed_gate(reserve())
    assert metrics.GATE_SECONDS._sum.get() - before >= 0.01


def test_a_model_nobody_offered_is_never_a_label_value():
    req = SimpleNamespace(model="attacker/" + "x" * 50, source="api")
    refused = SimpleNamespace(kind="refused", grant=None, reason="model_not_offered")
    metrics.turn_ended(req, refused)
    assert metrics.TURNS.labels("refused", "-", "api")._value.get() >= 1
    assert req.model not in metrics._models


def test_the_grafana_dashboard_reads_only_metrics_that_exist():
    import json
    import re

    dashboard = json.loads((ROOT / "docs" / "grafana-vtai.json").read_text())
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bvtai_\w+", target["expr"])
    }
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    exposed = {
        family.name + suffix
        for family in metrics.REGISTRY.collect()
        for suffix in suffixes.get(family.type, [""])
    }
    assert used and used <= exposed, used - exposed
