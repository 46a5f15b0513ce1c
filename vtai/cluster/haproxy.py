"""The balancer in front of several app processes: HAProxy's config, written to the data dir.

Sticky sessions: socket.io's polling requests and its websocket must reach the process that
holds the chat, so HAProxy inserts a cookie naming the process. The health check is /healthz
(the process is up), not /readyz: a database outage must not take every process out of the
pool. /metrics is refused at the balancer; each process serves its own on its internal port.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

CONFIG = "haproxy.cfg"
COOKIE = "VTAI_NODE"
INSTALL = "install it: sudo apt-get install haproxy (Debian's package), or run `make install`"


def binary() -> str | None:
    return shutil.which("haproxy")


def server_name(n: int) -> str:
    return f"p{n}"


def config(bind_host: str, bind_port: int, ports: list[int], secure: bool = False) -> str:
    """`ports[i]` serves process i+1 on 127.0.0.1. `secure`: the cookie only over HTTPS (set
    when VTAI_PUBLIC_URL is https, i.e. TLS ends in front of this balancer)."""
    servers = "\n".join(
        f"    server {server_name(n)} 127.0.0.1:{port} check cookie {server_name(n)}"
        for n, port in enumerate(ports, start=1)
    )
    flags = "insert indirect nocache httponly" + (" secure" if secure else "")
    return f"""# Written by VT.ai (`make run WORKERS={len(ports)}`) at every start: edits are lost.
# docs/deploy.md explains each part.
global
    maxconn 4096

defaults
    mode http
    timeout connect 5s
    # A chat's websocket stays open while the user reads and types.
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
    timeout http-request 30s
    # A request to a process that just died goes to another one.
    retries 2
    option redispatch
    option forwardfor

frontend vtai
    bind {bind_host}:{bind_port}
    http-request deny deny_status 404 if {{ path /metrics }} || {{ path_beg /metrics/ }}
    default_backend app

backend app
    balance roundrobin
    cookie {COOKIE} {flags}
    option httpchk GET /healthz
    http-check expect status 200
    default-server inter 1s fall 1 rise 1
{servers}
"""


def write(data_dir: Path, text: str) -> Path:
    path = Path(data_dir) / CONFIG
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path
