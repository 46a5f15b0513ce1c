"""Run every benchmark, each in a fresh process and a fresh database, and write the results
to docs/performance.md.

    python benchmarks/run_all.py                      # full sizes, embedded PostgreSQL
    python benchmarks/run_all.py --server-url postgresql://postgres@127.0.0.1:5432/postgres
    python benchmarks/run_all.py --quick --out /tmp/perf.md    # tiny sizes, minutes
    python benchmarks/run_all.py --only api_vs_proxy --merge   # re-run one, keep the rest

`--server-url` is a server where this may create and drop databases (as a superuser).
`--merge` replaces only the sections it ran (and their rows in the Targets table) in the
existing document. api_vs_proxy needs LiteLLM's proxy venv: `make bench-proxy-venv`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg  # noqa: E402

from benchmarks import common  # noqa: E402
from vtai.db import migrations  # noqa: E402

HERE = Path(__file__).resolve().parent

FULL = {
    "gate_latency": ["--sizes", "1000,100000,1000000", "--turns", "2000", "--seed-turns", "100"],
    "gate_rules": ["--rows", "1000000", "--turns", "2000", "--rounds", "4"],
    "turn_overhead": ["--levels", "1@25,50@5,200@20,50@25", "--turns", "500"],
    "api_vs_proxy": ["--levels=0@0,0@2,10@2", "--requests=300", "--clients=16", "--seconds=15"],
    "ingest": ["--rows", "20000", "--batch-rows", "100000"],
    "processes": ["--processes", "4", "--users", "200", "--seconds", "30"],
    "memory": ["--sessions", "200"],
    "retention": ["--rows", "1000000"],
    "socket_load": ["--levels", "50@20,200@20,500@20", "--seconds", "45"],
    "admin_scale": ["--rows", "10000000", "--users", "10000", "--export-rows", "1000000"],
}
QUICK = {
    "gate_latency": ["--sizes", "1000,10000", "--turns", "300", "--seed-turns", "30"],
    "gate_rules": ["--rows", "10000", "--turns", "300", "--rounds", "2"],
    "turn_overhead": ["--levels", "1@25,50@25", "--turns", "200"],
    "api_vs_proxy": ["--quick"],
    "ingest": ["--rows", "2000", "--batch-rows", "10000"],
    "processes": ["--processes", "4", "--users", "40", "--seconds", "5"],
    "memory": ["--sessions", "10"],
    "retention": ["--rows", "20000"],
    "socket_load": ["--levels", "3@2", "--seconds", "3", "--saturation-chats", "4"]
    + ["--saturation-seconds", "2", "--processes", "2", "--chunks", "5", "--gap-ms", "2"]
    + ["--local", "none"],
    "admin_scale": ["--rows", "20000", "--users", "100", "--export-rows", "2000"]
    + ["--requests", "20"],
}


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


async def fresh_database(server_url: str) -> str:
    name = f"vtai_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'create database "{name}"')
    finally:
        await admin.close()
    url = with_database(server_url, name)
    conn = await asyncpg.connect(url)
    try:
        await migrations.apply_pending(conn)
    finally:
        await conn.close()
    return url


async def drop_database(server_url: str, url: str) -> None:
    admin = await asyncpg.connect(server_url)
    try:
        name = urlsplit(url).path.lstrip("/")
        await admin.execute(f'drop database if exists "{name}" with (force)')
    finally:
        await admin.close()


async def run(server_url: str, plan: dict, names: list[str]) -> list[tuple[common.Section, str]]:
    done = []
    for name in names:
        url = await fresh_database(server_url)
        try:
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                load_before = common.load()
                cmd = [sys.executable, str(HERE / f"{name}.py"), "--db-url", url]
                cmd += ["--json", out.name, *plan[name]]
                print(f"== {name}: {' '.join(plan[name])} (load {load_before})", flush=True)
                t0 = time.monotonic()
                await asyncio.to_thread(subprocess.run, cmd, check=True)
                section = common.Section.from_dict(json.loads(out.read()))
                took = time.monotonic() - t0
                load = f"load average (1/5/15 min) {load_before} before, {common.load()} after"
                done.append((section, f"{load}; took {took:.0f} s"))
        finally:
            await drop_database(server_url, url)
    return done


def document(
    facts: dict, command: str, sections: list[tuple[common.Section, str]], old: str = ""
) -> str:
    out = [
        "# Performance",
        "",
        "Written by `benchmarks/run_all.py`; every figure below comes from the scripts in "
        "`benchmarks/`. Re-run them to check. These are benchmarks, not tests: "
        "`tests/test_benchmarks.py` only checks that they run and count right.",
        "",
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- command: `{command}`",
    ]
    out += [f"- {k}: {v}" for k, v in facts.items()]
    out += [
        "- each section gives the machine's load average around it: 2 cores run Postgres, "
        "the app and the load generator together.",
        "",
    ]
    targets = [(s.title, t) for s, _ in sections for t in s.targets]
    if targets:
        out += [
            "## Targets",
            "",
            "| section | target | goal | measured | met |",
            "|---|---|---|---|---|",
        ]
        out += [target_row(title, t) for title, t in targets]
        out.append("")
    for section, load in sections:
        out += [section.markdown(), f"_{load}._", ""]
    out += [*(line for block in hand_written(old) for line in block), ""] if old else []
    out.append(DESIGN)
    return "\n".join(out)


# Sections written by hand from the figures (no benchmark emits them): a full run keeps them.
HAND_WRITTEN = ("## Where the limit is",)


def hand_written(old: str) -> list[list[str]]:
    blocks: list[list[str]] = [[]]
    for line in old.splitlines():
        if line.startswith("## "):
            blocks.append([])
        blocks[-1].append(line)
    return [b for b in blocks if b and b[0] in HAND_WRITTEN]


def merge(old: str, command: str, sections: list[tuple[common.Section, str]]) -> str:
    """`old` with these sections replaced (or added before the design notes) and their rows in
    the Targets table replaced; everything else as it was."""
    blocks: list[list[str]] = [[]]
    for line in old.splitlines():
        if line.startswith("## "):
            blocks.append([])
        blocks[-1].append(line)
    titles = [b[0] if b and b[0].startswith("## ") else "" for b in blocks]
    design = DESIGN.splitlines()[0]
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    for section, load in sections:
        new = [*section.markdown().splitlines(), "", f"_{load}; merged in {when} by `{command}`._"]
        new.append("")
        heading = f"## {section.title}"
        if heading in titles:
            blocks[titles.index(heading)] = new
        else:
            at = titles.index(design) if design in titles else len(blocks)
            blocks.insert(at, new)
            titles.insert(at, heading)
    if "## Targets" in titles:
        table = blocks[titles.index("## Targets")]
        ran = {s.title for s, _ in sections}
        kept = [row for row in table if not any(row.startswith(f"| {t} |") for t in ran)]
        while kept and not kept[-1].strip():
            kept.pop()
        for section, _ in sections:
            kept += [target_row(section.title, t) for t in section.targets]
        blocks[titles.index("## Targets")] = [*kept, ""]
    return "\n".join(line for block in blocks for line in block).rstrip("\n") + "\n"


def target_row(title: str, t: common.Target) -> str:
    return (
        f"| {title} | {t.what} | {t.target} | {t.measured} | "
        + ("yes" if t.met else "**no**")
        + " |"
    )


DESIGN = """## What makes the meter fast, and what it costs

1. **Batched ledger writes** (`20261122000700_batch_ledger.sql`, `vtai/metering/ledger.py`).
   `vtai_record_batch` is the one definition of a ledger write (`vtai_record` is a one-row
   batch). The app's `Ledger` queues rows and sends whatever arrived while the previous batch
   was being written: a quiet app writes each row at once, a busy one pays one transaction
   and one WAL flush per batch. A batch the database rejects as bad data is retried row by
   row, so one bad row never sends its batch-mates to the spool; a database that is down
   sends the whole batch to the spool with one fsync.
2. **Aggregates per statement.** The usage buckets are kept by a statement-level trigger
   over the inserted rows: one upsert per bucket per batch instead of two per row. Three
   ledger indexes are gone: two were prefixes of the keyset indexes, one served no query.
3. **Rows in flight cost a write, not a file.** Each process keeps one append-only journal
   (`vtai/metering/journal.py`): a hold is one line, a batch's release one more. Creating and
   removing a file per row cost 40 us on the project's disk and 1 ms in `/tmp` here.
4. **The gate's common path is shorter.** `vtai_reserve` locks the counter with one SELECT
   (inserting it only in a user's first turn of a period) and probes an index before it
   looks for expired reservations. The gate has its own connection pool, so a reserve never
   waits behind ledger writes for a connection, and the pools skip asyncpg's reset query,
   a round trip on every release (an open transaction is still rolled back).
5. **Token counts are cached per message** (`vtai/llm/tokens.py`), equal to LiteLLM's
   `token_counter`, which costs 0.1-0.3 ms per call and used to run over the whole history
   on every turn.
6. **`VTAI_RESERVE_COMMIT=fast` is an option, not the default.** With it the gate's
   connections commit without waiting for the disk (`synchronous_commit=off`); any later
   durable commit on the server, such as the next ledger write, flushes it. Only a crash of
   Postgres itself in that moment can lose a reservation: its turn is still charged exactly
   when its row arrives, but until then another turn of the same user can be granted the
   same quota, so the user can end above the limit by at most what the lost reservations
   held. The default keeps the limit exact across crashes and pays one WAL flush per turn,
   which is the "commit floor" the gate table measures on this disk.
7. **The gate is off the reply's path** (`vtai/metering/ahead.py`, `VTAI_RESERVE_AHEAD=on`). A
   chat reserves its next turn when it opens and right after each answer, while the user
   reads and types; the turn then spends that reservation with no round trip. It is the same
   atomic `vtai_reserve`, released by `vtai_release` when the chat closes, so the limit holds
   exactly as before (docs/metering.md says when a turn reserves for itself instead).
8. **The reply returns at the usage chunk.** The usage chunk comes last; once it is in, the
   turn holds its row on disk and returns, and LiteLLM's end of stream (its success hooks,
   which write the full row) runs in the background. If that end fails, the held row is
   recorded instead.
9. **LiteLLM builds a finished stream once** (`vtai/llm/stream_end.py`). With usage in
   the stream, which exact billing needs, LiteLLM 1.106.2 runs `stream_chunk_builder` over
   the whole answer twice, about 1 ms plus 0.06 ms per chunk each time, in a worker thread.
   A start-up patch, applied only to that release, returns the first build the second time
   and builds short answers on the loop. Both sides of the per-turn table run with it (the
   bare side is the same process with metering off); the breakdown under the table compares
   LiteLLM as it ships, on a short and on a 330-chunk answer.
"""


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server-url", help="PostgreSQL server URL (superuser); default: embedded")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the scripts run")
    p.add_argument("--only", help="comma-separated benchmark names")
    p.add_argument("--out", type=Path, default=common.ROOT / "docs" / "performance.md")
    p.add_argument(
        "--merge",
        action="store_true",
        help="replace only the sections run (with --only) in the existing --out document",
    )
    args = p.parse_args()
    plan = QUICK if args.quick else FULL
    names = args.only.split(",") if args.only else list(plan)
    command = "python " + " ".join(["benchmarks/run_all.py", *sys.argv[1:]])
    if args.server_url:
        sections = await run(args.server_url, plan, names)
        facts = await common.machine(args.server_url)
    else:
        from vtai.db import embedded as embedded_pg

        with tempfile.TemporaryDirectory(prefix="vtai-bench-") as tmp:
            server = await asyncio.to_thread(embedded_pg.start, Path(tmp))
            try:
                sections = await run(server.url, plan, names)
                facts = await common.machine(server.url)
            finally:
                await asyncio.to_thread(server.stop)
    if args.merge and args.out.exists():
        args.out.write_text(merge(args.out.read_text(), command, sections))
    else:
        before = args.out.read_text() if args.out.exists() else ""
        args.out.write_text(document(facts, command, sections, before))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
