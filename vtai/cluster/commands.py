"""`vtai cluster status`: the processes `make run WORKERS=N` started, as the supervisor left
them in VTAI_DATA_DIR/cluster.json, each asked whether it is alive and healthy now."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from vtai.cluster import layout
from vtai.cluster.supervisor import STATE
from vtai.metering.spool import INFLIGHT

HEALTH_TIMEOUT = 2.0


class ClusterError(Exception):
    pass


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process by that pid: alive, if not ours
    return True


def _health(port: int) -> str:
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/healthz", timeout=HEALTH_TIMEOUT
        ) as r:
            return f"healthy (HTTP {r.status})"
    except urllib.error.HTTPError as exc:
        return f"unhealthy (HTTP {exc.code})"
    except (OSError, TimeoutError) as exc:
        return f"not answering ({type(exc).__name__})"


def _journals(data_dir: Path, n: int) -> int:
    """Journal files a process left in its directory: a dead one's wait for recovery."""
    directory = layout.process_dir(data_dir, n) / "spool" / INFLIGHT
    return len(list(directory.glob("*.jsonl"))) if directory.is_dir() else 0


def status_lines(data_dir: Path) -> tuple[list[str], bool]:
    """One line per process and the balancer; whether all of them are up."""
    path = Path(data_dir) / STATE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise ClusterError(
            f"no cluster has run with the data dir {data_dir} ({STATE} is missing): start "
            "one with `make run WORKERS=3`, or set VTAI_DATA_DIR to its data dir"
        ) from None
    except ValueError as exc:
        raise ClusterError(f"{path} is unreadable ({exc}): restart `make run WORKERS=N`") from None
    lines, all_up = [], True
    for name, entry in state.items():
        pid, port = entry.get("pid"), entry.get("port")
        alive = _alive(pid)
        if not alive:
            all_up = False
            how = "down (the supervisor restarts it, or is not running)"
        elif port is None:
            how = "running"
        else:
            how = _health(port)
            all_up = all_up and how.startswith("healthy")
        where = f"127.0.0.1:{port}" if port else "the balancer"
        line = f"{name:<10} pid {pid or '-':<8} {where:<16} {how}; restarts {entry['restarts']}"
        if name[1:].isdigit():  # p1, p2...: app processes (vtai.cluster.haproxy.server_name)
            left = _journals(data_dir, int(name[1:]))
            line += f"; journals {left}"
        lines.append(line)
    return lines, all_up


async def status(settings, args) -> int:
    try:
        lines, all_up = await asyncio.to_thread(status_lines, settings.data_dir)
    except ClusterError as exc:
        print(f"vtai: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0 if all_up else 1


def register(sub, user) -> None:
    """Add this module's commands: `sub` is vtai's subcommands, `user` those of `vtai user`."""
    cluster = sub.add_parser(
        "cluster", help="the app processes `make run WORKERS=N` runs behind HAProxy"
    ).add_subparsers(dest="action", required=True)
    cluster.add_parser(
        "status", help="each process: pid, port, /healthz now, restarts (exit 1 if one is down)"
    ).set_defaults(run=status)
