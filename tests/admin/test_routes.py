"""The /admin routes on a FastAPI app built here, with Chainlit's real JWTs and a real Postgres."""

from __future__ import annotations

import csv
import io
import random
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import httpx
import pytest
from chainlit.auth import create_jwt
from chainlit.user import User
from fastapi import FastAPI

from tests.conftest import add_user
from vtai.admin import export, reports
from vtai.admin import routes as admin

SECRET = "test-secret-" + "x" * 40
NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
MODELS = ("gpt-4o-mini", "anthropic/claude-3-5-haiku-latest", "local/smollm2-135m")
COLUMNS = (
    "litellm_call_id",
    "created_at",
    "end_user",
    "model",
    "provider",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "total_cost",
    "response_time",
    "period_start",
    "additional_details",
)


async def seed_traffic(
    conn, user_ids, count: int, end: datetime, days: int = 30, tie_every: int = 1, seed: int = 7
) -> None:
    """`count` request_logs rows spread over `days` days before `end`, via COPY.

    The aggregate trigger fills usage_aggregates; counters are set to the ledger's sums, as
    vtai_record would have. `tie_every` > 1 makes groups of rows share a created_at.
    """
    rnd = random.Random(seed)
    records = []
    at = end
    for i in range(count):
        if i % tie_every == 0:
            at = end - timedelta(seconds=rnd.uniform(60, days * 86400))
        status = rnd.choices(("success", "failure", "refused"), (90, 6, 4))[0]
        prompt = 0 if status == "refused" else rnd.randint(20, 900)
        completion = rnd.randint(10, 400) if status == "success" else 0
        model = MODELS[i % len(MODELS)]
        cost = Decimal(0) if model.startswith("local/") else Decimal(prompt + completion) / 10**6
        reason = '{"reason": "quota_exhausted"}' if status == "refused" else "{}"
        records.append(
            (
                f"seed-{uuid.uuid4()}",
                at,
                user_ids[i % len(user_ids)],
                model,
                model.split("/")[0] if "/" in model else "openai",
                status,
                prompt,
                completion,
                prompt + completion,
                cost,
                rnd.uniform(0.2, 4.0),
                datetime(at.year, at.month, 1, tzinfo=UTC),
                reason,
            )
        )
    await conn.copy_records_to_table("request_logs", records=records, columns=COLUMNS)
    await conn.execute(
        "insert into usage_counters (end_user, period_start, used)"
        " select end_user, period_start, sum(total_tokens) from request_logs"
        " group by 1, 2 on conflict (end_user, period_start) do update set used = excluded.used"
    )


@pytest.fixture
async def pool(db_url):
    p = await asyncpg.create_pool(db_url, min_size=1, max_size=4)
    yield p
    await p.close()


@pytest.fixture
async def client(pool, monkeypatch):
    monkeypatch.setenv("CHAINLIT_AUTH_SECRET", SECRET)
    app = FastAPI()
    admin.register(app, get_pool=lambda: pool, get_period=lambda: "month")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


def sign_in(client, profile, **metadata) -> None:
    """Set the cookie Chainlit's /login would set."""
    meta = {"id": str(profile.id), "tier": profile.tier, "is_admin": profile.is_admin, **metadata}
    token = create_jwt(User(identifier=profile.username, metadata=meta))
    client.cookies.set("access_token", token)


@pytest.fixture
async def boss(conn):
    return await add_user(conn, "boss", admin=True)


async def test_anonymous_is_sent_to_login_and_api_says_401(client):
    r = await client.get("/admin")
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert (await client.get("/admin/api/summary")).status_code == 401
    client.cookies.set("access_token", "not-a-jwt")
    assert (await client.get("/admin")).status_code == 303


async def test_non_admin_gets_403_even_with_a_stale_admin_claim(client, conn):
    bob = await add_user(conn, "bob")
    # The JWT claims admin (as a token issued before a demotion would); the database decides.
    sign_in(client, bob, is_admin=True)
    assert (await client.get("/admin")).status_code == 403
    for path in (
        "/admin/api/summary",
        "/admin/api/users",
        "/admin/api/logs",
        "/admin/api/logs.csv",
    ):
        assert (await client.get(path)).status_code == 403, path
    r = await client.post(f"/admin/api/users/{bob.id}/tier", json={"tier": "unlimited"})
    assert r.status_code == 403
    assert await conn.fetchval("select tier from profiles where id = $1", bob.id) == "free"


async def test_admin_is_checked_on_every_request(client, conn, boss):
    sign_in(client, boss)
    r = await client.get("/admin")
    assert r.status_code == 200 and "VT.ai admin" in r.text
    await conn.execute("update profiles set is_admin = false where id = $1", boss.id)
    assert (await client.get("/admin/api/summary")).status_code == 403


async def test_routes_go_before_the_catch_all_once():
    app = FastAPI()

    @app.get("/{full_path:path}")
    def spa():
        return "chainlit's page"

    admin.register(app, get_pool=lambda: None)
    admin.register(app, get_pool=lambda: None)  # again, as Chainlit's --watch re-import would
    assert sum(bool(getattr(r, "vtai_admin", False)) for r in app.router.routes) == 1
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        assert (await c.get("/admin")).status_code == 303
        assert (await c.get("/elsewhere")).json() == "chainlit's page"


async def test_tier_change_and_unknown_tier(client, conn, boss):
    bob = await add_user(conn, "bob")
    sign_in(client, boss)
    r = await client.post(f"/admin/api/users/{bob.id}/tier", json={"tier": "premium"})
    assert r.status_code == 200 and r.json()["tier"] == "premium"
    assert await conn.fetchval("select tier from profiles where id = $1", bob.id) == "premium"

    r = await client.post(f"/admin/api/users/{bob.id}/tier", json={"tier": "gold"})
    assert r.status_code == 400 and "unknown tier 'gold'" in r.json()["detail"]
    r = await client.post(f"/admin/api/users/{bob.id}/tier", json=["basic"])
    assert r.status_code == 400
    r = await client.post(f"/admin/api/users/{uuid.uuid4()}/tier", json={"tier": "basic"})
    assert r.status_code == 404
    r = await client.post(
        f"/admin/api/users/{bob.id}/tier",
        json={"tier": "basic"},
        headers={"Origin": "http://evil.example"},
    )
    assert r.status_code == 403
    assert await conn.fetchval("select tier from profiles where id = $1", bob.id) == "premium"

    users = (await client.get("/admin/api/users")).json()
    assert [t["name"] for t in users["tiers"]] == ["free", "basic", "premium", "unlimited"]
    row = next(u for u in users["users"] if u["username"] == "bob")
    assert (row["tier"], row["limit"], row["used"], row["remaining"]) == (
        "premium",
        500000,
        0,
        500000,
    )


async def test_keyset_pages_return_each_row_exactly_once(client, conn, pool, boss):
    a, b = await add_user(conn), await add_user(conn)
    # groups of 4 rows share a timestamp, so a page boundary falls inside a tie
    await seed_traffic(conn, [a.id, b.id], 233, NOW, tie_every=4)
    sign_in(client, boss)
    for params, where in (
        ({}, "true"),
        ({"user": str(a.id)}, f"end_user = '{a.id}'"),
        (
            {"model": MODELS[1], "status": "success"},
            f"model = '{MODELS[1]}' and status = 'success'",
        ),
    ):
        seen, cursor, pages = [], None, 0
        while True:
            q = {**params, "limit": 10} | ({"cursor": cursor} if cursor else {})
            page = (await client.get("/admin/api/logs", params=q)).json()
            seen += [r["id"] for r in page["rows"]]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
        expected = [
            r["id"]
            for r in await conn.fetch(
                f"select id from request_logs where {where} order by created_at desc, id desc"
            )
        ]
        assert seen == expected and len(set(seen)) == len(seen)
        assert pages == max(1, -(-len(expected) // 10))
    r = await client.get("/admin/api/logs", params={"cursor": "yesterday"})
    assert r.status_code == 400
    assert (await client.get("/admin/api/logs?status=ok")).status_code == 400


@pytest.mark.parametrize(
    ("where", "index"),
    [
        ("true", "request_logs_created_id_idx"),
        ("end_user = $1", "request_logs_end_user_created_id_idx"),
    ],
)
async def test_keyset_query_walks_an_index_without_sorting(conn, where, index):
    await conn.execute("set enable_seqscan = off; set enable_bitmapscan = off")
    plan = "\n".join(
        r[0]
        for r in await conn.fetch(
            f"explain select id from request_logs where {where} and (created_at, id) <"
            " (now(), 5) order by created_at desc, id desc limit 51",
            *([uuid.uuid4()] if "$1" in where else []),
        )
    )
    assert index in plan and "Sort" not in plan, plan


async def test_csv_contains_exactly_the_filtered_rows(client, conn, boss, monkeypatch):
    monkeypatch.setattr(export, "CSV_BATCH", 7)  # several batches in one download
    a, b = await add_user(conn, "=cmd"), await add_user(conn)
    await seed_traffic(conn, [a.id, b.id], 300, NOW)
    start, end = (NOW - timedelta(days=10)).date(), (NOW - timedelta(days=3)).date()
    params = {"user": str(a.id), "status": "success", "from": str(start), "to": str(end)}
    sign_in(client, boss)
    r = await client.get("/admin/api/logs.csv", params=params)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert "attachment" in r.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(r.text)))
    expected = await conn.fetch(
        "select id, total_tokens, total_cost from request_logs where end_user = $1"
        " and status = 'success' and created_at >= $2 and created_at < $3"
        " order by created_at desc, id desc",
        a.id,
        datetime(start.year, start.month, start.day, tzinfo=UTC),
        datetime(end.year, end.month, end.day, tzinfo=UTC) + timedelta(days=1),
    )
    assert len(expected) > 14
    assert [int(x["id"]) for x in rows] == [e["id"] for e in expected]
    assert [int(x["total_tokens"]) for x in rows] == [e["total_tokens"] for e in expected]
    assert {x["status"] for x in rows} == {"success"}
    # a username that a spreadsheet would run as a formula is defused
    assert {x["username"] for x in rows} == {"'=cmd"}


async def test_cards_and_charts_read_the_aggregates(client, conn, pool, boss):
    alice = await add_user(conn, "alice", tier="premium")
    carl = await add_user(conn, "carl")
    await seed_traffic(conn, [alice.id, carl.id], 400, NOW, days=40)
    # carl is over his free limit this period
    await conn.execute(
        "update usage_counters set used = 10000 where end_user = $1 and period_start = $2",
        carl.id,
        datetime(2026, 11, 1, tzinfo=UTC),
    )
    s = await reports.summary(pool, "month", NOW)
    today = NOW.replace(hour=0)
    ledger = await conn.fetchrow(
        "select count(*) filter (where created_at >= $1) as today,"
        " count(*) filter (where created_at >= $2) as period,"
        " sum(total_tokens) filter (where created_at >= $2) as tokens"
        " from request_logs",
        today,
        datetime(2026, 11, 1, tzinfo=UTC),
    )
    assert s["today"]["requests"] == ledger["today"]
    assert (s["this_period"]["requests"], s["this_period"]["tokens"]) == (
        ledger["period"],
        ledger["tokens"],
    )
    assert s["this_period"]["users"] == 2 and s["users_at_limit"] == 1
    # Proof the cards come from the buckets: add a bucket with no ledger rows; they follow.
    await conn.execute(
        "insert into usage_aggregates (granularity, bucket_start, end_user, model, requests,"
        " cost) values ('day', $1, $2, 'phantom', 1000, 7)",
        datetime(2026, 11, 5, tzinfo=UTC),
        alice.id,
    )
    changed = await reports.summary(pool, "month", NOW)
    assert changed["this_period"]["requests"] == s["this_period"]["requests"] + 1000

    series = await reports.series(pool, 30, NOW)
    assert series["granularity"] == "day" and len(series["points"]) == 30
    day = next(p for p in series["points"] if p["bucket"] == datetime(2026, 11, 5, tzinfo=UTC))
    assert day["requests"] >= 1000
    assert {m["model"] for m in series["by_model"]} == {*MODELS, "phantom"}
    assert series["by_model"][0]["model"] == "phantom"  # the costliest first
    hourly = await reports.series(pool, 1, NOW)
    assert hourly["granularity"] == "hour" and len(hourly["points"]) == 24

    # and the HTTP shape the page reads
    sign_in(client, boss)
    body = (await client.get("/admin/api/summary")).json()
    assert {"today", "this_period", "users_at_limit", "balances"} <= body.keys()
    assert (await client.get("/admin/api/series?days=0")).status_code == 400
    users = (await client.get("/admin/api/users")).json()
    assert set(users["models"]) == {*MODELS, "phantom"}
    last = next(u for u in users["users"] if u["username"] == "alice")["last_active"]
    assert last and datetime.fromisoformat(last) <= NOW


async def test_feedback_on_answers_is_listed_for_admins(client, conn, boss):
    user = await add_user(conn, "rater")
    await conn.execute(
        'insert into "User" (id, identifier) values ($1, $2)', str(user.id), user.username
    )
    await conn.execute(
        'insert into "Thread" (id, name, "userId") values ($1, $2, $3)',
        "thread-1",
        "Sea facts",
        str(user.id),
    )
    await conn.execute(
        'insert into "Step" (id, "threadId", type, output) values'
        " ('s1', 'thread-1', 'assistant_message', 'The sea is salty.'),"
        " ('s2', 'thread-1', 'assistant_message', 'Fish can fly.')"
    )
    await conn.execute(
        'insert into "Feedback" ("stepId", name, value, comment) values'
        " ('s1', 'user_feedback', 1, 'good'), ('s2', 'user_feedback', 0, 'wrong')"
    )
    sign_in(client, user)
    assert (await client.get("/admin/api/feedback")).status_code == 403
    sign_in(client, boss)
    rows = (await client.get("/admin/api/feedback")).json()
    assert {(r["value"], r["comment"], r["username"], r["thread"]) for r in rows} == {
        ("up", "good", "rater", "Sea facts"),
        ("down", "wrong", "rater", "Sea facts"),
    }


async def test_webhook_deliveries_and_their_failures_are_shown_and_retried(client, pool, boss):
    """The /admin Webhooks panel's API: per URL what was delivered and what fails, the newest
    errors, and the retry button (vtai.notify)."""
    from vtai.notify import outbox

    calls = outbox.PoolCalls(pool)
    await outbox.set_endpoints(calls, ("http://hooks.example/a",))
    assert await outbox.add(calls, "test.event", {"n": 1}) is not None
    (claimed,) = await outbox.claim(calls, 10, 60)
    assert await outbox.done(calls, claimed, 503, "HTTP 503: down", 1) == "retry"
    sign_in(client, boss)
    r = await client.get("/admin/api/webhooks")
    assert r.status_code == 200
    found = r.json()
    (endpoint,) = [e for e in found["endpoints"] if e["url"] == "http://hooks.example/a"]
    assert (endpoint["failing"], endpoint["delivered"]) == (1, 0)
    assert "HTTP 503: down" in str(found)
    r = await client.post("/admin/api/webhooks/retry")
    assert r.status_code == 200 and r.json() == {"retried": 1}
    client.cookies.clear()
    assert (await client.get("/admin/api/webhooks")).status_code == 401
