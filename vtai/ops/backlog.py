"""What waits in a spool: how many rows, and how old the oldest is.

The age is read from the oldest row's `created_at`, not from file times (a replay that stops
rewrites its file, and appends touch the active one). Rows are appended as their turns end, so
the first line of each pending file is its oldest: one line read per file, whatever the size.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path


@dataclass(frozen=True)
class Backlog:
    rows: int
    quarantined: int
    # seconds since the oldest waiting row's turn began; None when nothing waits
    oldest_age: float | None


def _first_row_time(path: Path) -> float | None:
    try:
        with path.open("rb") as f:
            for line in f:
                if line.strip():
                    created = json.loads(line).get("created_at")
                    return datetime.fromisoformat(created).timestamp()
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def of(spool, now: float | None = None) -> Backlog:
    """The backlog of a vtai.metering.spool.Spool. Blocking: reads its files."""
    status = spool.status()
    if not status.waiting:
        return Backlog(0, status.quarantined, None)
    times = [t for f in spool.pending_files() if (t := _first_row_time(f)) is not None]
    now = time.time() if now is None else now
    oldest = max(0.0, now - min(times)) if times else None
    return Backlog(status.waiting, status.quarantined, oldest)
