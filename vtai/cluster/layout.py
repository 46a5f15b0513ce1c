"""Where each of several app processes on one data dir keeps its own files.

    VTAI_DATA_DIR/
      haproxy.cfg        the balancer's config, written by `make run WORKERS=N`
      cluster.json       each process's port and pid, rewritten on every (re)start
      procs/<n>/spool/   process n's spool, and its journal in spool/inflight/

A process is told its directory in VTAI_PROCESS_DIR. Its siblings are the other directories
under the same procs/: a live process recovers a dead sibling's journal (its lock is free)
without waiting for the supervisor to restart it.
"""

from __future__ import annotations

from pathlib import Path

from vtai.metering.spool import INFLIGHT

PROCS = "procs"


def process_dir(data_dir: Path, n: int) -> Path:
    return Path(data_dir) / PROCS / str(n)


def peer_journals(process_dir: Path | None) -> list[Path]:
    """The journal directories of this process's siblings (none outside a procs/ layout)."""
    if process_dir is None:
        return []
    own = Path(process_dir).resolve()
    if own.parent.name != PROCS:
        return []
    return [
        sibling / "spool" / INFLIGHT
        for sibling in sorted(own.parent.iterdir())
        if sibling != own and (sibling / "spool" / INFLIGHT).is_dir()
    ]
