"""`vtai cluster status` where no cluster ran, and with a process down: one line each, and
the exit code says so. The live cluster's status is checked in test_process_dies.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT
from vtai.cluster import commands, layout
from vtai.cluster.supervisor import STATE


def test_no_cluster_is_one_line_naming_what_to_run(tmp_path):
    shown = subprocess.run(
        [sys.executable, "-m", "vtai.cli", "cluster", "status"],
        cwd=ROOT,
        env={**os.environ, "VTAI_DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 2
    (line,) = shown.stderr.strip().splitlines()
    assert "make run WORKERS=3" in line and str(tmp_path) in line


def test_a_dead_process_and_its_journal_are_shown(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    state = {
        "p1": {"pid": int(dead.stdout), "port": 1, "restarts": 3},
        "haproxy": {"pid": os.getpid(), "port": None, "restarts": 0},
    }
    (tmp_path / STATE).write_text(json.dumps(state))
    inflight = layout.process_dir(tmp_path, 1) / "spool" / "inflight"
    inflight.mkdir(parents=True)
    (inflight / "123-abc.jsonl").write_text("")
    lines, all_up = commands.status_lines(tmp_path)
    assert not all_up
    assert lines[0].startswith("p1 ") and "down" in lines[0] and "restarts 3" in lines[0]
    assert "journals 1" in lines[0]
    assert lines[1].startswith("haproxy ") and "running" in lines[1]
