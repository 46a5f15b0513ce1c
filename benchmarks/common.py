"""What every benchmark shares: a database, percentiles, result tables, the machine's facts.

Each script measures one thing and returns a `Section`; `run_all.py` turns sections into
docs/performance.md. Nothing here is timed against a threshold: the tests only check counts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Must precede `import litellm` anywhere, which otherwise fetches a price list over the network.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python benchmarks/x.py` must find tests.fake_provider

import asyncpg  # noqa: E402

from vtai.db import migrations  # noqa: E402

# A tier no benchmark reaches by accident, so the gate always does its full arithmetic.
BENCH_TIER = "bench"
BENCH_LIMIT = 10**15


@dataclass
class Target:
    what: str
    target: str
    measured: str
    met: bool
    why: str = ""


@dataclass
class Section:
    title: str
    command: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    data: dict = field(default_factory=dict)  # raw numbers, for the tests

    def markdown(self) -> str:
        out = [f"## {self.title}", "", f"`{self.command}`", ""]
        out.append("| " + " | ".join(self.columns) + " |")
        out.append("|" + "---|" * len(self.columns))
        out += ["| " + " | ".join(str(c) for c in row) + " |" for row in self.rows]
        if self.targets:
            out += ["", "| target | goal | measured | met |", "|---|---|---|---|"]
            for t in self.targets:
                verdict = "yes" if t.met else f"**no**: {t.why}"
                out.append(f"| {t.what} | {t.target} | {t.measured} | {verdict} |")
        if self.notes:
            out += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(out) + "\n"

    def text(self) -> str:
        widths = [
            max(len(str(x)) for x in col) for col in zip(self.columns, *self.rows, strict=True)
        ]
        line = "  ".join(f"{{:>{w}}}" for w in widths)
        out = [self.title, line.format(*self.columns)]
        out += [line.format(*map(str, row)) for row in self.rows]
        for t in self.targets:
            out.append(
                f"  target {t.what}: {t.target}, measured {t.measured}: "
                + ("met" if t.met else f"MISSED ({t.why})")
            )
        out += [f"  - {n}" for n in self.notes]
        return "\n".join(out)

    @classmethod
    def from_dict(cls, d: dict) -> Section:
        d = dict(d)
        d["targets"] = [Target(**t) for t in d.get("targets", [])]
        return cls(**d)


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank), so p99 of 2,000 samples is the 20th worst."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, round(p / 100 * len(s) + 0.5) - 1))
    return s[k]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--db-url",
        help="a migrated VT.ai database the benchmark may fill (use a scratch one); "
        "default: a migrated database on an embedded PostgreSQL in a temporary directory, "
        "removed afterwards",
    )
    p.add_argument("--json", type=Path, help="also write the result section here (run_all)")
    return p


@contextlib.asynccontextmanager
async def database(url: str | None):
    """A migrated database URL: the given one, or a throwaway embedded server's."""
    if url:
        await add_bench_tier(url)
        yield url
        return
    from vtai.db import embedded as embedded_pg

    with tempfile.TemporaryDirectory(prefix="vtai-bench-") as tmp:
        server = await asyncio.to_thread(embedded_pg.start, Path(tmp))
        try:
            conn = await asyncpg.connect(server.url)
            try:
                await migrations.apply_pending(conn)
            finally:
                await conn.close()
            await add_bench_tier(server.url)
            yield server.url
        finally:
            await asyncio.to_thread(server.stop)


@contextlib.contextmanager
def data_dir():
    """A scratch app data directory where the app keeps its own (`.vtai/`), not in /tmp: on
    these machines /tmp takes about 1 ms to create a file, 25 times the project's disk, and
    the ledger creates one per turn while the row is in flight."""
    base = ROOT / ".vtai"
    base.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-", dir=base) as tmp:
        yield Path(tmp)


async def add_bench_tier(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "insert into tiers (name, token_limit, rank) values ($1, $2, 9)"
            " on conflict (name) do update set token_limit = excluded.token_limit",
            BENCH_TIER,
            BENCH_LIMIT,
        )
    finally:
        await conn.close()


async def add_users(conn: asyncpg.Connection, n: int, tier: str = BENCH_TIER) -> list[uuid.UUID]:
    """n profiles without passwords: the gate needs only the profile and its tier."""
    tag = uuid.uuid4().hex[:8]
    rows = await conn.fetch(
        "insert into profiles (username, tier)"
        " select 'bench-' || $1 || '-' || g, $2 from generate_series(1, $3) g returning id",
        tag,
        tier,
        n,
    )
    return [r["id"] for r in rows]


async def counters_exact(conn: asyncpg.Connection) -> bool:
    return await conn.fetch("select * from vtai_verify_counters()") == []


async def machine(url: str) -> dict:
    conn = await asyncpg.connect(url)
    try:
        server = await conn.fetchval("select version()")
        names = ["shared_buffers", "synchronous_commit", "fsync", "max_connections"]
        settings = {n: await conn.fetchval("select current_setting($1)", n) for n in names}
    finally:
        await conn.close()
    return {
        **await asyncio.to_thread(_host),
        "postgres": server.split(" on ")[0],
        "postgres settings": ", ".join(f"{k}={v}" for k, v in sorted(settings.items())),
    }


def _host() -> dict:
    from importlib.metadata import version

    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "cpu": f"{cpu} ({os.cpu_count()} cores)",
        "memory": _meminfo_total(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "litellm": version("litellm"),
        "asyncpg": version("asyncpg"),
        "commit": commit,
    }


def _meminfo_total() -> str:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return f"{int(line.split()[1]) // 1024} MiB"
    return "?"


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def rss_mib(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def finish(section: Section, json_path: Path | None) -> Section:
    print(section.text(), flush=True)
    if json_path:
        json_path.write_text(json.dumps(asdict(section), default=str))
    return section
