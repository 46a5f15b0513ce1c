"""/admin at ten million ledger rows: every dashboard route through the real HTTP server.

Seeds a scratch database (never CI's) with ROWS ledger rows across USERS users over DAYS
days, COPYed with triggers off and the secondary indexes dropped, then rebuilt; the usage
buckets rebuilt with `vtai_backfill_aggregates` and the period counters from the ledger, as
the app's triggers and settles would have left them (loading is not timed). Re-running on a
database that already holds the seed skips the load.

Then it starts the app (`chainlit run vtai/main.py`, one process), logs an admin in over
HTTP, and times every /admin API route with CONCURRENCY clients at once (p50/p95/p99): the
summary cards, each chart range, the users table, the first and a deep page of the request
log with each filter, and the CSV export of EXPORT rows (rows/s, the app's RSS while it
streams). Also `/usage` through the chat's socket and `vtai usage` on the command line.

    python benchmarks/admin_scale.py [--db-url URL] [--rows 10000000] [--users 10000]
        [--days 90] [--export-rows 1000000] [--requests 100] [--concurrency 10]
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import aiohttp  # noqa: E402
import asyncpg  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.common import ROOT, ms, pct  # noqa: E402
from vtai.admin.reports import encode_cursor  # noqa: E402
from vtai.db import accounts  # noqa: E402

PASSWORD = "scale-bench-password"
ADMIN = "scale-admin"
MODELS = (  # (name, provider, share of rows, USD per prompt token, per completion token)
    ("gpt-4o-mini", "openai", 0.55, 0.15e-6, 0.6e-6),
    ("claude-3-5-haiku-latest", "anthropic", 0.2, 0.8e-6, 4e-6),
    ("gpt-4o", "openai", 0.15, 2.5e-6, 10e-6),
    ("gemini/gemini-2.0-flash", "gemini", 0.1, 0.1e-6, 0.4e-6),
)
TIERS = (("free", 0.6), ("basic", 0.25), ("premium", 0.12), ("unlimited", 0.03))
COPY_BATCH = 200_000
COLUMNS = [
    "litellm_call_id", "created_at", "end_user", "session_id", "model", "provider", "status",
    "prompt_tokens", "completion_tokens", "total_tokens", "total_cost", "response_time",
    "period_start", "messages", "response", "error", "additional_details", "weight",
    "counted_tokens", "day_start", "source",
]  # fmt: skip
MESSAGES = json.dumps([{"role": "user", "content": "Summarise this paragraph in two lines."}])
RESPONSE = json.dumps("Sure: the paragraph says the meter holds at scale, and why.")
ERROR = json.dumps({"class": "RateLimitError", "message": "provider rate limit, retry later"})
REFUSED = json.dumps({"reason": "quota"})


def call_id(i: int) -> str:
    return f"seed-{i:010d}"


def month_start(at: datetime) -> datetime:
    return at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def _pick(table, r: float):
    for item in table:
        r -= item[-1] if len(item) == 2 else item[2]
        if r < 0:
            return item
    return table[-1]


# --- the seed ------------------------------------------------------------------------------


async def seeded(conn: asyncpg.Connection, rows: int) -> bool:
    return bool(
        await conn.fetchval(
            "select exists(select 1 from request_logs where litellm_call_id = $1)",
            call_id(rows - 1),
        )
    )


async def seed(url: str, rows: int, users: int, days: int, progress=print) -> dict:
    """The scratch database filled (or found filled); returns what the measurements need."""
    conn = await asyncpg.connect(url)
    try:
        if not await seeded(conn, rows):
            await _load(conn, rows, users, days, progress)
        return await _facts(conn, rows)
    finally:
        await conn.close()


async def _load(conn: asyncpg.Connection, rows: int, users: int, days: int, progress) -> None:
    t0 = time.monotonic()
    now = datetime.now(UTC)
    start = now - timedelta(days=days)
    tiers = [_pick(TIERS, (i + 0.5) / users)[0] for i in range(users)]
    ids = await conn.fetch(
        "insert into profiles (username, tier)"
        " select 'scale-' || lpad(g::text, 6, '0'), ($2::text[])[g]"
        " from generate_series(1, $1) g returning id, username",
        users,
        tiers,
    )
    ids = [r["id"] for r in sorted(ids, key=lambda r: r["username"])]
    # Bulk load as a restore would: triggers off (replica role: a superuser), the secondary
    # indexes built once afterwards rather than row by row.
    indexes = await conn.fetch(
        "select i.relname as name, pg_get_indexdef(x.indexrelid) as ddl from pg_index x"
        " join pg_class i on i.oid = x.indexrelid"
        " where x.indrelid = 'public.request_logs'::regclass and not x.indisprimary"
        " and not exists (select 1 from pg_constraint c where c.conindid = x.indexrelid)"
    )
    for ix in indexes:
        await conn.execute(f'drop index public."{ix["name"]}"')
    await conn.execute("set session_replication_role = replica")
    span = (now - start).total_seconds() - 60
    rnd = random.Random(21)
    done = 0
    while done < rows:
        n = min(COPY_BATCH, rows - done)
        batch = []
        for i in range(done, done + n):
            at = start + timedelta(seconds=span * i / rows)
            # Heavy users chat much more than light ones (a quadratic skew over 10^4 users).
            u = int(users * rnd.random() ** 2)
            model, provider, _, p_in, p_out = _pick(MODELS, rnd.random())
            r = rnd.random()
            status = "failure" if r < 0.02 else "refused" if r < 0.03 else "success"
            prompt = 0 if status == "refused" else 40 + int(rnd.random() * 400)
            completion = 20 + int(rnd.random() * 300) if status == "success" else 0
            total = prompt + completion
            day = at.replace(hour=0, minute=0, second=0, microsecond=0)
            batch.append(
                (
                    call_id(i), at, ids[u], f"s{u}-{day:%m%d}", model, provider, status,
                    prompt, completion, total, prompt * p_in + completion * p_out,
                    0.3 + rnd.random() * 3, month_start(at),
                    MESSAGES, RESPONSE if status == "success" else None,
                    ERROR if status == "failure" else None,
                    REFUSED if status == "refused" else "{}",
                    1, total, day, "chat",
                )
            )  # fmt: skip
        await conn.copy_records_to_table("request_logs", records=batch, columns=COLUMNS)
        done += n
        progress(f"  seeded {done:,} of {rows:,} ledger rows ({time.monotonic() - t0:.0f} s)")
    await conn.execute("reset session_replication_role")
    await conn.execute("set maintenance_work_mem = '512MB'")
    for ix in indexes:
        progress(f"  building {ix['name']} ({time.monotonic() - t0:.0f} s)")
        await conn.execute(ix["ddl"])
    progress(f"  usage buckets from the ledger ({time.monotonic() - t0:.0f} s)")
    await conn.execute("select vtai_backfill_aggregates($1, $2)", start, now + timedelta(days=1))
    progress(f"  period counters from the ledger ({time.monotonic() - t0:.0f} s)")
    await conn.execute(
        "insert into usage_counters as c (end_user, period_start, used, used_raw, cost_used)"
        " select end_user, period_start, sum(counted_tokens), sum(total_tokens),"
        " sum(total_cost) from request_logs group by end_user, period_start"
        " on conflict (end_user, period_start) do update set used = excluded.used,"
        " used_raw = excluded.used_raw, cost_used = excluded.cost_used"
    )
    hashed = await asyncio.to_thread(accounts._hasher.hash, PASSWORD)
    await accounts.create_user(conn, ADMIN, PASSWORD, "unlimited", True)
    # The ten heaviest users can log in (for /usage through the chat).
    await conn.execute(
        "insert into vtai_private.credentials (profile_id, password_hash)"
        " select unnest($1::uuid[]), $2",
        ids[:10],
        hashed,
    )
    progress(f"  vacuum analyze ({time.monotonic() - t0:.0f} s)")
    await conn.execute("vacuum analyze")
    await conn.execute("checkpoint")
    progress(f"  seeded in {time.monotonic() - t0:.0f} s")


async def _facts(conn: asyncpg.Connection, rows: int) -> dict:
    """Untimed look-ups the measurements need: users, cursors at depth, the export's range."""
    heavy = await conn.fetch(
        "select id, username from profiles where username like 'scale-%' order by username limit 10"
    )
    total = await conn.fetchval("select count(*) from request_logs")
    aggregates = await conn.fetchval("select count(*) from usage_aggregates")

    async def cursor_at(depth: int, where: str = "true", *args) -> str | None:
        row = await conn.fetchrow(
            f"select created_at, id from request_logs r where {where}"
            f" order by created_at desc, id desc offset {int(depth)} limit 1",
            *args,
        )
        return encode_cursor(row["created_at"], row["id"]) if row else None

    return {
        "rows": total,
        "aggregates": aggregates,
        "heavy": [(str(r["id"]), r["username"]) for r in heavy],
        "cursor_half": await cursor_at(total // 2),
        "cursor_deep": await cursor_at(max(total - 1000, 0)),
        "cursor_user_deep": await cursor_at(
            max(await conn.fetchval("select count(*) from request_logs where end_user = $1",
                                    heavy[0]["id"]) - 100, 0),
            "r.end_user = $1", heavy[0]["id"],
        ),
        "cursor_model_deep": await cursor_at(rows // 20, "r.model = $1", MODELS[3][0]),
        "cursor_failure_deep": await cursor_at(rows // 100, "r.status = 'failure'"),
        "middle_user": await conn.fetchval(
            "select username from profiles order by username offset"
            " (select count(*) / 2 from profiles) limit 1"
        ),
        "newest": await conn.fetchval("select max(created_at) from request_logs"),
        "oldest": await conn.fetchval("select min(created_at) from request_logs"),
    }  # fmt: skip


# --- the measurements ----------------------------------------------------------------------


@dataclass
class Timed:
    route: str
    seconds: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    bytes: int = 0


async def admin_cookie(base: str) -> str:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/login", data={"username": ADMIN, "password": PASSWORD}) as r:
            if r.status != 200 or "access_token" not in r.cookies:
                raise RuntimeError(f"admin login failed: HTTP {r.status} {await r.text()}")
            return r.cookies["access_token"].value


async def hammer(
    http: aiohttp.ClientSession, base: str, route: str, requests: int, concurrency: int
) -> Timed:
    """`requests` GETs of `route`, `concurrency` at a time (each client back to back)."""
    out = Timed(route)

    async def one() -> None:
        t0 = time.perf_counter()
        try:
            async with http.get(base + route) as r:
                body = await r.read()
                if r.status != 200:
                    out.errors.append(f"HTTP {r.status}: {body[:200]!r}")
                    return
                out.bytes = len(body)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            out.errors.append(f"{type(exc).__name__}: {exc}"[:200])
            return
        out.seconds.append(time.perf_counter() - t0)

    # Warm: the plans cached, the pages in memory, and the app's connection pool grown to
    # `concurrency` (else the first route measured pays for opening its connections).
    for _ in range(2):
        await asyncio.gather(*(one() for _ in range(concurrency)))
    out.seconds.clear()
    per_client = max(1, requests // concurrency)

    async def client() -> None:
        for _ in range(per_client):
            await one()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return out


async def export(http: aiohttp.ClientSession, base: str, route: str, pid: int) -> dict:
    """Stream the CSV to its end, counting rows; the app's RSS sampled every 50 ms."""
    rss = [common.rss_mib(pid)]
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            rss.append(common.rss_mib(pid))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.05)

    sampler = asyncio.create_task(sample())
    lines, size = 0, 0
    t0 = time.perf_counter()
    first = None
    try:
        async with http.get(base + route) as r:
            if r.status != 200:
                raise RuntimeError(f"export: HTTP {r.status} {(await r.text())[:200]}")
            async for chunk in r.content.iter_any():
                first = first or time.perf_counter()
                lines += chunk.count(b"\n")
                size += len(chunk)
    finally:
        done.set()
        await sampler
    seconds = time.perf_counter() - t0
    return {
        "rows": lines - 1,  # the header
        "seconds": seconds,
        "first_byte": (first or t0) - t0,
        "rows_per_s": (lines - 1) / seconds,
        "mib": size / 2**20,
        "rss_before": rss[0],
        "rss_peak": max(rss),
        "rss_after": common.rss_mib(pid),
    }


def routes(facts: dict) -> list[tuple[str, str, str]]:
    """(kind, what, path): kind 'dashboard' (<= 100 ms) or 'log' (<= 50 ms)."""
    user, _ = facts["heavy"][0]
    model = MODELS[3][0]
    newest = facts["newest"].date()
    week = (newest - timedelta(days=7)).isoformat()
    q = urllib.parse.quote
    out = [
        ("dashboard", "summary cards", "/admin/api/summary"),
        ("dashboard", "chart, last day (hourly)", "/admin/api/series?days=1"),
        ("dashboard", "chart, last 7 days", "/admin/api/series?days=7"),
        ("dashboard", "chart, last 30 days", "/admin/api/series?days=30"),
        ("dashboard", "chart, last 90 days", "/admin/api/series?days=90"),
        # What the page asks for: 100 users by name, "More users" from a name on, the search
        # box (names starting with what is typed), the log's user filter (20 names at most).
        ("dashboard", "users table, first 100 (as the page opens)", "/admin/api/users?limit=100"),
        ("dashboard", "users table, 100 after the middle name (More users)",
         f"/admin/api/users?limit=100&after={q(facts['middle_user'])}"),
        ("dashboard", "users table, search: names starting with a prefix",
         f"/admin/api/users?limit=100&q={q(facts['middle_user'][:-2])}"),
        ("dashboard", "log's user filter, 20 names starting with a prefix",
         f"/admin/api/users?limit=20&q={q(facts['middle_user'][:-3])}"),
        ("dashboard", "feedback", "/admin/api/feedback"),
        ("dashboard", "balances", "/admin/api/balances"),
        ("dashboard", "API keys", "/admin/api/keys"),
        ("dashboard", "plans", "/admin/api/plans"),
        ("log", "log, first page", "/admin/api/logs"),
        ("log", "log, page at half depth", f"/admin/api/logs?cursor={q(facts['cursor_half'])}"),
        ("log", "log, last page (deepest)", f"/admin/api/logs?cursor={q(facts['cursor_deep'])}"),
        ("log", "log, one user, first page", f"/admin/api/logs?user={user}"),
        ("log", "log, one user, deepest page",
         f"/admin/api/logs?user={user}&cursor={q(facts['cursor_user_deep'])}"),
        ("log", "log, one model, first page", f"/admin/api/logs?model={q(model)}"),
        ("log", "log, one model, deep page",
         f"/admin/api/logs?model={q(model)}&cursor={q(facts['cursor_model_deep'])}"),
        ("log", "log, failures, first page", "/admin/api/logs?status=failure"),
        ("log", "log, failures, deep page",
         f"/admin/api/logs?status=failure&cursor={q(facts['cursor_failure_deep'])}"),
        ("log", "log, last 7 days, first page", f"/admin/api/logs?from={week}"),
        ("log", "log, one model, refused, a past week",
         f"/admin/api/logs?model={q(model)}&status=refused&from="
         f"{(newest - timedelta(days=60)).isoformat()}&to={(newest - timedelta(days=53))}"),
        ("log", "log, one user, failures", f"/admin/api/logs?user={user}&status=failure"),
    ]  # fmt: skip
    return out


def export_route(facts: dict, rows: int) -> str:
    """A date range holding about `rows` rows (whole days, ending yesterday)."""
    days = max(1, round(rows / facts["rows"] * (facts["newest"] - facts["oldest"]).days))
    end = facts["newest"].date() - timedelta(days=1)
    start = end - timedelta(days=days - 1)
    return f"/admin/api/logs.csv?from={start.isoformat()}&to={end.isoformat()}"


async def usage_in_chat(base: str, facts: dict, requests: int, concurrency: int) -> Timed:
    """`/usage` sent as a chat message by `concurrency` of the heaviest users at once."""
    from tests.chainlit_client import chat

    out = Timed("/usage in the chat")
    people = [await chat(base, name, PASSWORD) for _, name in facts["heavy"][:concurrency]]
    try:
        for p in people:  # warm
            await p.send("/usage")

        async def client(p) -> None:
            for _ in range(max(1, requests // concurrency)):
                t0 = time.perf_counter()
                reply = await p.send("/usage", timeout=60)
                if "Usage this" not in reply.text:
                    out.errors.append(f"unexpected reply {reply.text[:80]!r}")
                    continue
                out.seconds.append(time.perf_counter() - t0)

        await asyncio.gather(*(client(p) for p in people))
    finally:
        for p in people:
            await p.close()
    return out


def cli_usage(db_url: str, username: str, runs: int) -> dict:
    """`vtai usage NAME` as a person runs it (a new process each time), and `vtai --help` for
    what Python and the imports cost alone."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VTAI_", "SUPABASE_"))}
    env["VTAI_DATABASE_URL"] = db_url
    exe = str(Path(sys.executable).parent / "vtai")

    def timed(args: list[str]) -> list[float]:
        out = []
        for _ in range(runs):
            t0 = time.perf_counter()
            subprocess.run([exe, *args], env=env, check=True, capture_output=True, cwd=ROOT)
            out.append(time.perf_counter() - t0)
        return out

    usage = timed(["usage", username])
    bare = timed(["--help"])
    return {"p50": pct(usage, 50), "p95": pct(usage, 95), "startup_p50": pct(bare, 50)}


async def bench(
    db_url: str,
    rows: int,
    users: int,
    days: int,
    export_rows: int,
    requests: int,
    concurrency: int,
    progress=print,
    cli_runs: int = 5,
) -> common.Section:
    from benchmarks import socket_load

    facts = await seed(db_url, rows, users, days, progress)
    data: dict = {"rows": facts["rows"], "aggregates": facts["aggregates"], "routes": {}}
    data |= {"users": users, "days": days, "requests": requests, "concurrency": concurrency}
    with common.data_dir() as tmp:
        async with socket_load.app("vtai", tmp, "http://127.0.0.1:9/v1", db_url) as server:
            base, pid = server.bases[0], server.pids[0]
            token = await admin_cookie(base)
            headers = {"Cookie": f"access_token={token}"}
            connector = aiohttp.TCPConnector(limit=0)
            timeout = aiohttp.ClientTimeout(total=600)
            async with aiohttp.ClientSession(
                connector=connector, timeout=timeout, headers=headers
            ) as http:
                for kind, what, path in routes(facts):
                    t = await hammer(http, base, path, requests, concurrency)
                    data["routes"][what] = {"kind": kind, "path": path, **timed_stats(t)}
                    progress(f"  {what}: {fmt(data['routes'][what])}")
                route = export_route(facts, export_rows)
                data["export"] = {"path": route, **await export(http, base, route, pid)}
                progress(f"  export: {data['export']}")
            chat_requests = max(concurrency, requests // 2)
            t = await usage_in_chat(base, facts, chat_requests, concurrency)
            data["usage_chat"] = timed_stats(t)
            progress(f"  /usage: {fmt(data['usage_chat'])}")
            data["rss_end"] = common.rss_mib(pid)
    data["cli"] = await asyncio.to_thread(cli_usage, db_url, facts["heavy"][0][1], cli_runs)
    data["cli"]["runs"] = cli_runs
    return section(data, rows, export_rows)


def timed_stats(t: Timed) -> dict:
    return {
        "requests": len(t.seconds),
        "errors": len(t.errors),
        "first_error": t.errors[0] if t.errors else None,
        "bytes": t.bytes,
        "p50": pct(t.seconds, 50),
        "p95": pct(t.seconds, 95),
        "p99": pct(t.seconds, 99),
    }


def fmt(d: dict) -> str:
    return (
        f"p50 {ms(d['p50'])} p95 {ms(d['p95'])} p99 {ms(d['p99'])} ms "
        f"({d['requests']} requests, {d['errors']} errors)"
    )


GOALS = {"dashboard": 0.100, "log": 0.050}


def _why(d: dict, goal: float, concurrency: int) -> str:
    if d["p50"] <= goal / 2:
        return (
            f"p50 {ms(d['p50'])} ms: one stall of the app held the ~{concurrency} requests in "
            "flight (a full garbage collection of the app process takes ~200 ms: see the notes)"
        )
    return "see the notes"


def section(data: dict, rows: int, export_rows: int) -> common.Section:
    c = data["concurrency"]
    table, targets = [], []
    for what, d in data["routes"].items():
        goal = GOALS[d["kind"]]
        table.append(
            [what, f"`{d['path'].split('?')[0]}`", d["requests"], ms(d["p50"]), ms(d["p95"]),
             ms(d["p99"]), f"{d['bytes']:,}", d["errors"]]
        )  # fmt: skip
        targets.append(
            common.Target(
                f"{what}, p95 with {c} concurrent admin requests",
                f"<= {goal * 1000:.0f} ms",
                f"{ms(d['p95'])} ms",
                d["p95"] <= goal and not d["errors"],
                d.get("why") or _why(d, goal, c),
            )
        )
    u = data["usage_chat"]
    table.append(["`/usage` in the chat (socket.io)", "—", u["requests"], ms(u["p50"]),
                  ms(u["p95"]), ms(u["p99"]), "—", u["errors"]])  # fmt: skip
    cli = data["cli"]
    table.append(["`vtai usage NAME` (a new process)", "—", cli["runs"], ms(cli["p50"]),
                  ms(cli["p95"]), "—", "—", 0])  # fmt: skip
    e = data["export"]
    table.append([f"CSV export, {e['rows']:,} rows", "`/admin/api/logs.csv`", 1,
                  ms(e["seconds"]), "—", "—", f"{e['mib']:.0f} MiB", 0])  # fmt: skip
    targets.append(
        common.Target(
            f"CSV export of {export_rows:,} rows",
            ">= 50,000 rows/s, memory flat",
            f"{e['rows_per_s']:,.0f} rows/s ({e['rows']:,} rows in {e['seconds']:.1f} s); "
            f"RSS {e['rss_before']:.0f} MiB before, peak {e['rss_peak']:.0f}, "
            f"after {e['rss_after']:.0f}",
            e["rows_per_s"] >= 50_000 and e["rss_peak"] - e["rss_before"] < 64,
            data.get("export_why", "see the notes"),
        )
    )
    notes = [
        f"{data['rows']:,} ledger rows across {data['users']:,} users over {data['days']} "
        "days, COPYed with triggers off, the secondary indexes built afterwards, then "
        "`vtai_backfill_aggregates` over the whole range and the period counters from the "
        f"ledger ({data['aggregates']:,} hour and day buckets); loading not timed. Rows are "
        "time-ordered like a real ledger; heavy users chat most (user = 10^4 x r^2); "
        "4 models (55/20/15/10 %); 2 % failures, 1 % refusals; a short prompt and answer "
        "stored as content in every row.",
        "Each route: `chainlit run vtai/main.py` (one process) on that database, an admin "
        f"logged in with `POST /login`, {c} clients sending GETs back to back with the "
        f"admin's cookie, {data['requests']} requests per route after 2 warm-up rounds of "
        f"{c} at once. "
        "Times in ms from the request to the last byte of the body, at the client "
        "(aiohttp, this process). Targets: p95 <= 100 ms for dashboard routes, <= 50 ms for "
        "log pages.",
        "Deep pages: the keyset cursor (`next_cursor`) of the row at that depth, as the page "
        "would have passed it after paging that far: half of the ledger, and its oldest rows.",
        f"CSV export: the date range holding about {export_rows:,} rows "
        f"(`{e['path']}`), streamed to the client's end; first byte after "
        f"{ms(e['first_byte'])} ms, {e['mib']:.0f} MiB. RSS of the app process sampled every "
        "50 ms while it streamed.",
        f"`/usage`: {c} of the heaviest users, each in their own chat, send `/usage` back to "
        "back; from the message to the end of its task (the quota line and the per-day chart "
        "from the counters and `daily` buckets). `vtai usage NAME`: the command's wall time, "
        f"a new Python process each time; `vtai --help` alone takes {ms(cli['startup_p50'])} "
        "ms (Python and the imports).",
    ]
    notes += [
        "Cards and charts (migration `20261208000000_admin_reads.sql`): closed days from "
        "`usage_rollups`, today's closed hours from `usage_hour_rollups` (each built by the "
        "first read that needs it, dropped by the bucket triggers when a late row changes "
        "it), the current hour from the live hour buckets (a few thousand rows); active "
        "users today and this period counted in `usage_last_active` (each user's newest "
        "hour bucket, kept by statement triggers on the buckets), which the users table "
        "also reads instead of probing each user's buckets.",
        "Users: the page asks for 100 names at a time (`?limit=100`, then `&after=` the "
        "last name for More users), the search box for names starting with what is typed "
        "(`&q=`, an index on the lower-cased name), the log's user filter for 20 such names; "
        "it no longer asks for all 10^4 users at once (the route still answers that without "
        "`limit`, about 3.6 s here, so the row is gone from this table). Concurrent summary "
        "requests share the one computation under way (nothing is kept once it is done).",
        "The app per request: JSON by `json.dumps` (the C encoder) instead of FastAPI's "
        "`jsonable_encoder`; responses gzipped by the app at level 1 (Chainlit's GZip "
        "middleware compresses at level 9, 13 MB/s here); the origin check no longer hops "
        "to a worker thread. The admin's profile is still read from the database on every "
        "request (nothing cached: a demoted admin's next request is refused).",
        "Stalls: before `gc.freeze()` after start-up (`vtai/main.py`), a full (generation "
        "2) garbage collection of the app process, which holds ~440,000 objects after "
        "start-up, took 210-250 ms (timed with `gc.callbacks`, and seen to coincide with the "
        "stall); one came in each run of this benchmark (~2,500 requests), and the route it "
        "landed in had its ~10 requests in flight held: that route's p95 (220 ms for "
        "balances in the run before this one). Frozen, start-up's objects are left out of "
        "every collection.",
        "CSV: Postgres renders each cell as the text the app's Python writer used to "
        "(byte-identical; `tests/admin/test_scale_reads.py` compares them on awkward "
        "values); the app joins cells with `csv.writer` (C), fetches the next 5,000-row "
        "keyset batch while it writes this one, and gzips at level 1 in a worker thread "
        "when the client accepts gzip (aiohttp does, as browsers do).",
    ]
    notes += data.get("extra_notes", [])
    columns = ["route", "path", "requests", "p50", "p95", "p99", "bytes", "errors"]
    command = (
        f"python benchmarks/admin_scale.py --rows {rows} --users {data['users']} "
        f"--days {data['days']} --export-rows {export_rows} --requests {data['requests']} "
        f"--concurrency {c}"
    )
    return common.Section("/admin at ten million rows", command, columns, table, notes,
                          targets, data)  # fmt: skip


async def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--days", type=int, default=90)
    p.add_argument("--export-rows", type=int, default=1_000_000)
    p.add_argument("--requests", type=int, default=100, help="per route")
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument(
        "--merge",
        type=Path,
        metavar="DOC",
        help="also replace this section (and its rows in the Targets table) in DOC, "
        "e.g. docs/performance.md, as `run_all.py --merge` does",
    )
    args = p.parse_args()

    def progress(line: str) -> None:
        print(line, flush=True)

    load_before = common.load()
    async with common.database(args.db_url) as url:
        t0 = time.monotonic()
        result = await bench(
            url, args.rows, args.users, args.days, args.export_rows, args.requests,
            args.concurrency, progress,
        )  # fmt: skip
        took = time.monotonic() - t0
        machine = await common.machine(url)
    common.finish(result, args.json)
    if args.merge:
        from benchmarks import run_all

        when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        load = (
            f"load average (1/5/15 min) {load_before} before, {common.load()} after (other "
            f"engineers' work on the same 2 cores); took {took:.0f} s of measurement (the "
            f"seed, loaded before, is not timed); run {when} on {machine['postgres']} "
            f"({machine['postgres settings']})"
        )
        command = "python benchmarks/admin_scale.py " + " ".join(
            "--db-url <the seeded scratch database>" if a.startswith("--db-url") else a
            for a in _without_db_url(sys.argv[1:])
        )
        args.merge.write_text(run_all.merge(args.merge.read_text(), command, [(result, load)]))
        print(f"merged into {args.merge}")


def _without_db_url(argv: list[str]) -> list[str]:
    """argv without the URL after --db-url (it holds a password): the flag alone stays."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--db-url":
            out.append("--db-url")
            skip = True
        else:
            out.append(a)
    return out


if __name__ == "__main__":
    asyncio.run(main())
