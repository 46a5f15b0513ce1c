"""What /admin reads at scale: the CSV rendered by Postgres, byte for byte the CSV the app
used to write row by row in Python; the users table paged and searched; each user's last
activity and today's hour rollups kept right by the bucket triggers."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from tests.admin import test_routes
from tests.admin.test_routes import seed_traffic, sign_in
from tests.conftest import add_user
from vtai.admin import export, reports
from vtai.admin.reports import LogFilter, encode_cursor, log_query

# The route tests' fixtures: a pool, an app client, a signed-in admin.
pool, client, boss = test_routes.pool, test_routes.client, test_routes.boss

# --- the CSV as the app wrote it before Postgres rendered it (kept here as the reference) ---


def _old_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    text = str(value)
    if isinstance(value, str) and text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + text
    return text


def _old_row(record) -> list:
    out = []
    for i, value in enumerate(record):
        if value is None:
            out.append("unknown" if i == 10 else "")
        elif isinstance(value, int | float):
            out.append(value)
        else:
            out.append(_old_cell(value))
    return out


async def old_csv(db, f: LogFilter) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(export.CSV_COLUMNS)
    cursor = None
    while True:
        sql, args = log_query(f, cursor, 1000)
        rows = await db.fetch(sql, *args)
        writer.writerows(map(_old_row, rows[:1000]))
        if len(rows) <= 1000:
            return buf.getvalue()
        cursor = encode_cursor(rows[999]["created_at"], rows[999]["id"])


async def new_csv(db, f: LogFilter) -> str:
    return "".join([chunk async for chunk in export.csv_rows(db, f)])


TRICKY_NAMES = ("a,b", 'say"hi"', "=SUM(A1)", "+1", "-2", "@me", "zoë_日本", "'quoted'", "x")
TRICKY_TEXT = (
    "plain",
    "comma, inside",
    'a "quoted" word',
    "two\nlines",
    "cr\rhere",
    "crlf\r\nend",
    "=cmd|' /C calc'!A0",
    "+plus",
    "-minus",
    "@at",
    "\tstarts with a tab",
    "\rstarts with a CR",
    "ünïcödé ✓ 日本語",
    "",
    "\\.",
    " spaced ",
)
COSTS = (
    Decimal("0"),
    Decimal("0.00000050"),
    Decimal("0.00000001"),
    Decimal("0.00000100"),
    Decimal("0.00001234"),
    Decimal("1.5"),
    Decimal("123456.12345678"),
    Decimal("-0.00000020"),
    Decimal("-3.25"),
)
TIMES = (None, 0.0, 1.0, 123.0, 0.3, 2.718, 1e-5, 3.5e-7, -1.25)


async def test_csv_equals_the_old_format_for_tricky_values(conn, pool, monkeypatch):
    users = [await add_user(conn, n) for n in TRICKY_NAMES]
    at = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
    rows = []
    i = 0
    for text in TRICKY_TEXT:
        for cost in COSTS:
            i += 1
            status = ("success", "failure", "refused")[i % 3]
            details = {"cost_unknown": True} if i % 7 == 0 else {}
            if status == "refused":
                details["reason"] = text
            error = {"class": text, "message": text + " msg"} if status == "failure" else None
            rows.append(
                (
                    f"tricky-{i}",
                    # whole seconds for some rows: isoformat then has no fraction
                    at - timedelta(seconds=i * 7, microseconds=0 if i % 4 else i * 37),
                    # a row of nobody (no profile) now and then
                    users[i % len(users)].id if i % 11 else uuid.uuid4(),
                    text if i % 2 else "gpt-4o-mini",
                    text if i % 5 == 0 else "openai",
                    status,
                    i * 10,
                    i,
                    i * 11,
                    cost,
                    TIMES[i % len(TIMES)],
                    at.replace(day=1),
                    json.dumps(details),
                    json.dumps(error) if error else None,
                )
            )
    await conn.copy_records_to_table(
        "request_logs",
        records=rows,
        columns=[
            "litellm_call_id", "created_at", "end_user", "model", "provider", "status",
            "prompt_tokens", "completion_tokens", "total_tokens", "total_cost",
            "response_time", "period_start", "additional_details", "error",
        ],
    )  # fmt: skip
    # several batches, each fetched while the one before is written
    monkeypatch.setattr(export, "CSV_BATCH", 17)
    for f in (LogFilter(), LogFilter(status="failure"), LogFilter(user=users[2].id)):
        old, new = await old_csv(pool, f), await new_csv(pool, f)
        assert new == old
    text = await new_csv(pool, LogFilter())
    parsed = list(csv.reader(io.StringIO(text)))
    assert len(parsed) == len(rows) + 1
    assert "'=SUM(A1)" in {r[2] for r in parsed}
    assert {"0E-8", "5.0E-7", "1E-8", "0.00000100", "-2.0E-7", "unknown"} <= {r[10] for r in parsed}
    assert "two\nlines" in {r[4] for r in parsed}


async def test_csv_stops_its_prefetch_when_the_client_goes(conn, pool, monkeypatch):
    a = await add_user(conn)
    await seed_traffic(conn, [a.id], 50, datetime(2026, 11, 20, tzinfo=UTC))
    monkeypatch.setattr(export, "CSV_BATCH", 5)
    chunks = export.csv_rows(pool, LogFilter())
    assert (await anext(chunks)).startswith("id,created_at")
    assert (await anext(chunks)).count("\n") == 5
    await chunks.aclose()  # as Starlette does when the download is cancelled
    await asyncio.sleep(0.05)
    # the pool is whole: every connection back
    assert pool.get_idle_size() == pool.get_size()


# --- users: pages of 100, search by name ---------------------------------------------------


async def test_users_page_by_name_and_search_by_prefix(client, conn, boss):
    names = [f"pg{i:03d}" for i in range(250)] + ["Zed_one", "zed%two", "zebra"]
    # Profiles only: the table lists them, and a password hash each would cost 25 s.
    await conn.execute(
        "insert into profiles (username, tier) select unnest($1::text[]), 'free'", names
    )
    sign_in(client, boss)
    seen, after = [], None
    while True:
        params = {"limit": 100} | ({"after": after} if after else {})
        page = (await client.get("/admin/api/users", params=params)).json()
        seen += [u["username"] for u in page["users"]]
        if len(page["users"]) < 100:
            break
        after = page["users"][-1]["username"]
    everyone = [r["username"] for r in await conn.fetch("select username from profiles")]
    assert sorted(seen) == sorted(everyone) and len(set(seen)) == len(seen)
    assert seen == [
        r["username"] for r in await conn.fetch("select username from profiles order by 1")
    ]

    async def search(q, **more):
        r = await client.get("/admin/api/users", params={"q": q, "limit": 100, **more})
        assert r.status_code == 200
        return [u["username"] for u in r.json()["users"]]

    assert await search("pg12") == [f"pg{i}" for i in range(120, 130)]
    assert set(await search("ZED")) == {"Zed_one", "zed%two"}
    # % and _ are letters here, not wildcards
    assert await search("zed%") == ["zed%two"]
    assert await search("zed_") == ["Zed_one"]
    assert await search("z_") == []
    # search pages too
    first = await search("pg", after="pg050")
    assert first[0] == "pg051" and len(first) == 100
    assert await search("nobody") == []
    r = await client.get("/admin/api/users", params={"q": "x" * 65})
    assert r.status_code == 400


async def test_last_activity_follows_the_buckets(conn, pool):
    a, b = await add_user(conn), await add_user(conn)
    at = datetime(2026, 11, 20, 9, 30, tzinfo=UTC)
    await seed_traffic(conn, [a.id], 20, at, days=2)
    newest = await conn.fetchval(
        "select max(date_trunc('hour', created_at at time zone 'UTC') at time zone 'UTC')"
        " from request_logs where end_user = $1",
        a.id,
    )
    last = "select last_hour from usage_last_active where end_user = $1"
    assert await conn.fetchval(last, a.id) == newest
    assert await conn.fetchval(last, b.id) is None
    # a late row, older than the newest: no change
    await seed_traffic(conn, [a.id], 1, at - timedelta(days=5), days=1, seed=3)
    assert await conn.fetchval(last, a.id) == newest
    # the newest hour's buckets deleted (as a backfill does): back to the newest left
    await conn.execute(
        "delete from usage_aggregates where end_user = $1 and bucket_start >= $2",
        a.id,
        newest,
    )
    left = await conn.fetchval(
        "select max(bucket_start) from usage_aggregates where end_user = $1"
        " and granularity = 'hour'",
        a.id,
    )
    assert left < newest and await conn.fetchval(last, a.id) == left
    await conn.execute("delete from usage_aggregates where end_user = $1", a.id)
    assert await conn.fetchval(last, a.id) is None
    # the users table reads it
    table = await reports.user_table(pool, "month", q=b.username[:6], limit=10)
    assert table["users"][0]["last_active"] is None


async def test_today_from_hour_rollups_and_the_live_hour(conn, pool):
    a = await add_user(conn)
    now = datetime.now(UTC)
    # rows over the last 30 hours, some of them in the current hour
    await seed_traffic(conn, [a.id], 300, now, days=1.25)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    expected = await conn.fetchval(
        "select count(*) from request_logs where created_at >= $1", today
    )
    s = await reports.summary(pool, "month", now)
    assert s["today"]["requests"] == expected and s["today"]["users"] == 1
    hourly = await reports.series(pool, 1, now)
    assert sum(p["requests"] for p in hourly["points"]) == expected
    rolled = await conn.fetchval("select count(*) from usage_hour_rollups")
    assert rolled >= now.hour  # one row per closed hour of today at least
    # a late row in a closed hour of today drops that hour's rollup; the next read counts it
    if now.hour > 0:
        late = today + timedelta(minutes=5)
        await seed_traffic(conn, [a.id], 1, late + timedelta(seconds=61), days=0.0001, seed=5)
        s2 = await reports.summary(pool, "month", now)
        assert s2["today"]["requests"] == expected + 1
        daily = await reports.series(pool, 7, now)
        assert daily["points"][-1]["requests"] == expected + 1


async def test_the_app_gzips_its_own_answers_when_asked(client, conn, boss):
    a = await add_user(conn, "=gz")
    await seed_traffic(conn, [a.id], 120, datetime(2026, 11, 20, tzinfo=UTC))
    sign_in(client, boss)
    for path in ("/admin/api/logs", "/admin/api/logs.csv"):
        plain = await client.get(path, headers={"Accept-Encoding": "identity"})
        packed = await client.get(path, headers={"Accept-Encoding": "gzip, deflate"})
        assert plain.status_code == packed.status_code == 200
        assert "content-encoding" not in plain.headers
        assert packed.headers["content-encoding"] == "gzip"
        assert "Accept-Encoding" in packed.headers["vary"]
        assert packed.content == plain.content  # httpx undid the gzip
    page = (await client.get("/admin/api/logs")).json()
    row = page["rows"][0]
    # the JSON as FastAPI's encoder wrote it: isoformat times, the id as text, cost a number
    assert datetime.fromisoformat(row["created_at"]).tzinfo is not None
    assert uuid.UUID(row["end_user"]) == a.id and isinstance(row["total_cost"], float)


async def test_one_users_failures_walk_their_own_index(conn):
    # A heavy user's failures are 2 % of their rows: the partial index holds only those
    # (and refusals), in keyset order, so a page reads 50 index entries, not 2,500 rows.
    await conn.execute("set enable_seqscan = off; set enable_bitmapscan = off")
    for status in ("failure", "refused"):
        plan = "\n".join(
            r[0]
            for r in await conn.fetch(
                "explain select id from request_logs where end_user = $1 and status = $2"
                " and (created_at, id) < (now(), 5) order by created_at desc, id desc limit 51",
                uuid.uuid4(),
                status,
            )
        )
        assert "request_logs_end_user_unsuccessful_idx" in plan and "Sort" not in plan, plan


async def test_admins_asking_at_once_share_one_summary(pool, monkeypatch):
    computed = []

    async def slow(pool, period, now):
        computed.append(now)
        await asyncio.sleep(0.05)
        return {"period": period, "n": len(computed)}

    monkeypatch.setattr(reports, "_summary", slow)
    first = await asyncio.gather(*(reports.summary(pool, "month") for _ in range(5)))
    assert len(computed) == 1 and all(s == first[0] for s in first)
    # done: the next request computes afresh (nothing is kept)
    assert (await reports.summary(pool, "month"))["n"] == 2
    # another period is its own computation; a given time is never shared
    await asyncio.gather(reports.summary(pool, "week"), reports.summary(pool, "month"))
    assert len(computed) == 4
    when = datetime(2026, 11, 20, tzinfo=UTC)
    await asyncio.gather(*(reports.summary(pool, "month", when) for _ in range(2)))
    assert len(computed) == 6
    # one waiter cancelled (a closed tab) leaves the others their answer
    a = asyncio.ensure_future(reports.summary(pool, "month"))
    b = asyncio.ensure_future(reports.summary(pool, "month"))
    await asyncio.sleep(0.01)
    a.cancel()
    assert (await b)["n"] == 7
