"""The `make run WORKERS=N` parent: N Chainlit processes on internal ports, HAProxy in front,
and a restart for any of them that dies.

Ports: the balancer listens on CHAINLIT_PORT; process n on CHAINLIT_PORT + n, on 127.0.0.1
only (its /metrics is there). Each process gets VTAI_PROCESS_DIR=VTAI_DATA_DIR/procs/<n> for
its spool and journal; the data dir itself, the database and CHAINLIT_AUTH_SECRET are shared.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vtai import datadir
from vtai.cluster import haproxy, layout

log = logging.getLogger(__name__)

STATE = "cluster.json"
# A process that dies sooner than this after starting waits before the next start, doubling.
QUICK_DEATH = 10.0
MAX_BACKOFF = 30.0


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    port: int | None = None
    proc: subprocess.Popen | None = None
    started: float = 0.0
    backoff: float = 0.0
    restarts: int = 0
    due: float = 0.0

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env)
        self.started = time.monotonic()


def chainlit_argv(app: Path, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "chainlit",
        "run",
        str(app),
        "--headless",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def trusted_with_balancer(configured: tuple[str, ...]) -> str:
    """VTAI_TRUSTED_PROXIES for a process behind the local balancer: its own plus 127.0.0.1."""
    return ",".join(dict.fromkeys([*configured, "127.0.0.1"]))


class Supervisor:
    def __init__(self, settings, workers: int, app: Path, env: dict[str, str]):
        self.settings = settings
        self.data_dir = settings.data_dir
        self.workers = workers
        self.stopping = False
        base = settings.chainlit_port
        self.ports = [base + n for n in range(1, workers + 1)]
        self.children: list[Child] = []
        for n, port in enumerate(self.ports, start=1):
            child_env = dict(env)
            proc_dir = layout.process_dir(self.data_dir, n)
            proc_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            child_env["VTAI_PROCESS_DIR"] = str(proc_dir)
            child_env["VTAI_TRUSTED_PROXIES"] = trusted_with_balancer(settings.trusted_proxies)
            self.children.append(
                Child(haproxy.server_name(n), chainlit_argv(app, port), child_env, port)
            )
        secure = (settings.public_url or "").startswith("https://")
        text = haproxy.config(settings.chainlit_host, base, self.ports, secure)
        datadir.ensure(self.data_dir)
        self.config_path = haproxy.write(self.data_dir, text)
        binary = haproxy.binary()
        if binary is None:
            raise RuntimeError(f"HAProxy is not installed: {haproxy.INSTALL}")
        # -db: stay in the foreground, so this process is its parent and sees it die.
        self.children.append(
            Child("haproxy", [binary, "-db", "-f", str(self.config_path)], dict(env))
        )

    def start(self) -> None:
        for child in self.children:
            child.start()
        self._write_state()

    def _write_state(self) -> None:
        state = {
            c.name: {"pid": c.proc.pid if c.proc else None, "port": c.port, "restarts": c.restarts}
            for c in self.children
        }
        path = Path(self.data_dir) / STATE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1) + "\n")
        os.replace(tmp, path)

    def step(self) -> None:
        """Restart whatever died; call it often (every 0.2 s)."""
        now = time.monotonic()
        changed = False
        for child in self.children:
            if child.proc is None:
                if now >= child.due:
                    child.start()
                    changed = True
                continue
            code = child.proc.poll()
            if code is None or self.stopping:
                continue
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            quick = now - child.started < QUICK_DEATH
            child.backoff = min(max(child.backoff * 2, 1.0), MAX_BACKOFF) if quick else 0.0
            print(
                f"vtai: {child.name} (pid {child.proc.pid}) ended with {how}; restarting"
                + (f" in {child.backoff:.0f} s" if child.backoff else ""),
                file=sys.stderr,
                flush=True,
            )
            child.restarts += 1
            child.proc = None
            child.due = now + child.backoff
            if not child.backoff:
                child.start()
            changed = True
        if changed:
            self._write_state()

    def run(self, forwarded: Callable[[], bool]) -> int:
        """Supervise until interrupted (KeyboardInterrupt), then stop everything.
        `forwarded()`: whether the interrupt must be passed on (False: Ctrl-C in a terminal,
        which reached the children already; a second SIGINT would cut their shutdown short)."""
        self.start()
        try:
            while True:
                time.sleep(0.2)
                self.step()
        except KeyboardInterrupt:
            self.stop(forward=forwarded())
        finally:
            self.stop(forward=True)
        return 0

    def stop(self, forward: bool = True, timeout: float = 15.0) -> None:
        self.stopping = True
        running = [c for c in self.children if c.proc is not None and c.proc.poll() is None]
        # The balancer first, so no request reaches a process that is shutting down.
        for child in running if forward else ():
            child.proc.send_signal(signal.SIGTERM if child.name == "haproxy" else signal.SIGINT)
        deadline = time.monotonic() + timeout
        for child in running:
            try:
                child.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
