"""Run every benchmark, each in a fresh process and a fresh database, and write the results
to docs/performance.md.

    python benchmarks/run_all.py                      # full sizes, embedded PostgreSQL
    python benchmarks/run_all.py --server-url postgresql://postgres@127.0.0.1:5432/postgres
    python benchmarks/run_all.py --quick --out /tmp/perf.md    # tiny sizes, minutes

`--server-url` is a server where this may create and drop databases (as a superuser).
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
from benchmarks.gate_latency import ASYNC_MARKER  # noqa: E402
from benchmarks.ingest import RECORD_BATCH_SQL  # noqa: E402
from vtai import migrations  # noqa: E402

HERE = Path(__file__).resolve().parent

FULL = {
    "gate_latency": ["--sizes", "1000,100000,1000000", "--turns", "2000", "--seed-turns", "100"],
    "turn_overhead": ["--users", "1,50,200", "--turns", "1000", "--rate", "25"],
    "ingest": ["--rows", "20000", "--batch-rows", "100000"],
    "processes": ["--processes", "4", "--users", "200", "--seconds", "30"],
    "memory": ["--sessions", "200"],
}
QUICK = {
    "gate_latency": ["--sizes", "1000,10000", "--turns", "300", "--seed-turns", "30"],
    "turn_overhead": ["--users", "1,50", "--turns", "200"],
    "ingest": ["--rows", "2000", "--batch-rows", "10000"],
    "processes": ["--processes", "4", "--users", "40", "--seconds", "5"],
    "memory": ["--sessions", "10"],
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


def document(facts: dict, command: str, sections: list[tuple[common.Section, str]]) -> str:
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
        "- the machine is shared: other engineers ran test suites (pytest, headless Chromium) "
        "during the run; each section gives the load average around it.",
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
        for title, t in targets:
            out.append(f"| {title} | {t.what} | {t.target} | {t.measured} | "
                       + ("yes" if t.met else "**no**") + " |")  # fmt: skip
        out.append("")
    for section, load in sections:
        out += [section.markdown(), f"_{load}._", ""]
    out.append(
        PROPOSALS.format(async_line=ASYNC_MARKER.strip(), batch_sql=RECORD_BATCH_SQL.strip())
    )
    return "\n".join(out)


PROPOSALS = """## Proposed changes (not applied: the migrations belong to the metering owners)

Both were created only in the benchmarks' scratch databases; their figures are above.

1. **Reserve without waiting for the WAL flush.** Add one line at the top of
   `vtai_reserve`'s body (a new migration re-creating the function):

   ```sql
   {async_line}
   ```

   `set_config(..., true)` lasts until the end of the transaction, so it covers the commit
   (a `SET` clause on the function would be undone before the commit). The gate's transaction
   then commits without waiting for the disk: see the "async reserve" columns of the gate
   table. The ledger is untouched: `vtai_record` still commits synchronously, and its flush
   also makes every earlier reservation durable. What a database crash can lose is only
   reservations made in the last moments before it (at most 3 x `wal_writer_delay`), of turns
   whose settle had not yet run; such a turn is still charged exactly when its row arrives
   (`vtai_record` finds no reservation and just adds the usage), so counters stay equal to the
   ledger; only the limit check for those in-flight turns is weakened, once, after a crash.

2. **Batched ledger writes.** `vtai_record_batch(jsonb[])` applies the same rules as
   `vtai_record` to many rows in one statement; the app's `Ledger` would queue rows from the
   callback and flush every few milliseconds or every 100 rows (one in-flight batch per pool
   connection, the spool unchanged for failures). See the "batch" row of the ingest table.

   ```sql
{batch_sql}
   ```

3. **Aggregate per statement, not per row** (not measured here). The `request_logs_aggregate`
   trigger (20261122000500_usage_aggregates.sql) upserts an hour and a day bucket for every
   ledger row. Declared `for each statement` with `referencing new table as new_rows` (and
   old tables for update/delete), it would group the statement's rows by bucket and upsert
   each bucket once, in key order: the same cost as today for a single-row `vtai_record`,
   and one upsert per bucket instead of two per row for `vtai_record_batch`.
"""


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server-url", help="PostgreSQL server URL (superuser); default: embedded")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the scripts run")
    p.add_argument("--only", help="comma-separated benchmark names")
    p.add_argument("--out", type=Path, default=common.ROOT / "docs" / "performance.md")
    args = p.parse_args()
    plan = QUICK if args.quick else FULL
    names = args.only.split(",") if args.only else list(plan)
    command = "python " + " ".join(["benchmarks/run_all.py", *sys.argv[1:]])
    if args.server_url:
        sections = await run(args.server_url, plan, names)
        facts = await common.machine(args.server_url)
    else:
        from vtai import embedded_pg

        with tempfile.TemporaryDirectory(prefix="vtai-bench-") as tmp:
            server = await asyncio.to_thread(embedded_pg.start, Path(tmp))
            try:
                sections = await run(server.url, plan, names)
                facts = await common.machine(server.url)
            finally:
                await asyncio.to_thread(server.stop)
    args.out.write_text(document(facts, command, sections))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
