"""Logins: the throttle holds under parallel guesses, says nothing about which names exist,
and its entries expire. Through the real server, the way an attacker would try."""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid

import asyncpg
import httpx
import pytest

from tests.browser import PASSWORD, running_app
from tests.conftest import add_user, create_database, drop_database


@pytest.fixture(scope="module")
async def app(pg_server, template_db, tmp_path_factory):
    url = await create_database(pg_server, template_db)
    data_dir = tmp_path_factory.mktemp("throttle-app")
    try:
        # The test client stands behind a trusted proxy, so each test picks its address.
        async with running_app(url, data_dir, VTAI_TRUSTED_PROXIES="127.0.0.1/32") as base:
            yield base, url
    finally:
        await drop_database(pg_server, url)


@pytest.fixture
async def db(app):
    c = await asyncpg.connect(app[1])
    yield c
    await c.close()


def fake_addr() -> str:
    return f"198.18.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250 + 1}"


async def key_row(db, name: str | None = None, addr: str | None = None):
    key = await db.fetchval("select (public.vtai_login_keys($1, $2))[1]", name or "", addr)
    if addr is not None:
        key = "addr:" + addr
    return await db.fetchrow("select * from vtai_private.login_throttle where key = $1", key)


async def attempt(http, name: str, password: str, addr: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    r = await http.post(
        "/login",
        data={"username": name, "password": password},
        headers={"X-Forwarded-For": addr},
    )
    return r, time.monotonic() - started


@pytest.mark.slow
async def test_parallel_password_guesses_are_throttled(app, db):
    base, _ = app
    user = await add_user(db, f"t{uuid.uuid4().hex[:6]}")
    addr = fake_addr()
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        results = await asyncio.gather(
            *(attempt(http, user.username, f"guess {i}", addr) for i in range(40))
        )
    elapsed = time.monotonic() - started
    assert {r.status_code for r, _ in results} == {401}
    assert len({r.text for r, _ in results}) == 1  # one answer, whatever happened inside
    row = await key_row(db, user.username)
    # Counted in the database, atomically: 3 free, then slots 0.5, 1.5, 3.5, 7.5 s out; the
    # rest would have waited more than 10 s and were refused without a password check.
    assert row["attempts"] == 7 and row["refused"] == 33, dict(row)
    assert elapsed >= 7.0, elapsed
    assert sum(t < 1.0 for _, t in results) <= 3 + 33
    # Further attempts queue behind the guesses, one check per 8 s: even the right password
    # waits for its slot.
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        r, t = await attempt(http, user.username, PASSWORD, addr)
    assert r.status_code == 200 and t >= 5.0, (r.status_code, t)


@pytest.mark.slow
async def test_guesses_spread_over_names_are_throttled_per_address(app, db):
    base, _ = app
    addr = fake_addr()
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        await asyncio.gather(*(attempt(http, f"nobody{i}", "guess", addr) for i in range(30)))
    row = await key_row(db, addr=addr)
    assert row["attempts"] < 30 and row["refused"] > 0, dict(row)


async def test_unknown_name_and_wrong_password_look_the_same(app, db):
    base, _ = app
    user = await add_user(db, f"t{uuid.uuid4().hex[:6]}")
    unknown = f"t{uuid.uuid4().hex[:6]}"
    known_times, unknown_times, answers = [], [], set()
    async with httpx.AsyncClient(base_url=base) as http:
        for _ in range(3):  # within the 3 free attempts per name
            for name, times in ((user.username, known_times), (unknown, unknown_times)):
                r, t = await attempt(http, name, "wrong password", fake_addr())
                times.append(t)
                headers = {k: v for k, v in r.headers.items() if k not in ("date",)}
                answers.add((r.status_code, r.text, tuple(sorted(headers.items()))))
    assert len(answers) == 1, answers
    # Same hashing work either way: the medians differ by far less than one argon2 check.
    k, u = statistics.median(known_times), statistics.median(unknown_times)
    assert abs(k - u) < max(0.5 * min(k, u), 0.03), (known_times, unknown_times)
    # And the throttle counts both the same.
    assert (await key_row(db, user.username))["attempts"] == 3
    assert (await key_row(db, unknown))["attempts"] == 3


async def test_right_password_resets_the_name_not_the_address(app, db):
    base, _ = app
    user = await add_user(db, f"t{uuid.uuid4().hex[:6]}")
    addr = fake_addr()
    async with httpx.AsyncClient(base_url=base) as http:
        for _ in range(2):
            await attempt(http, user.username, "wrong", addr)
        r, _ = await attempt(http, user.username, PASSWORD, addr)
    assert r.status_code == 200
    assert await key_row(db, user.username) is None
    assert (await key_row(db, addr=addr))["attempts"] == 2  # the failures, not the success


async def test_throttle_entries_expire(conn):
    """SQL-level, on a database of its own: the sweep's bound is counted exactly."""
    waits = [await conn.fetchval("select public.vtai_login_attempt('exp', null)") for _ in range(5)]
    assert waits[:3] == [0, 0, 0] and waits[3] == pytest.approx(0.5, abs=0.2)
    assert waits[4] == pytest.approx(1.5, abs=0.2)
    row = await key_row(conn, "exp")
    assert row["attempts"] == 5
    # 15 minutes after its last slot the entry is over: the next attempt starts afresh.
    await conn.execute(
        "update vtai_private.login_throttle set expires_at = now() - interval '1 second'"
        " where key = $1",
        row["key"],
    )
    assert await conn.fetchval("select public.vtai_login_attempt('exp', null)") == 0
    assert (await key_row(conn, "exp"))["attempts"] == 1
    # Entries of names never tried again are deleted by other attempts' bounded sweep.
    names = [f"gone{i}" for i in range(30)]
    for name in names:
        await conn.fetchval("select public.vtai_login_attempt($1, '192.0.2.1')", name)
    await conn.execute(
        "update vtai_private.login_throttle set expires_at = now() - interval '1 second'"
        " where key like 'name:%' and key <> $1",
        row["key"],
    )
    before = await conn.fetchval("select count(*) from vtai_private.login_throttle")
    await conn.fetchval("select public.vtai_login_attempt('exp', null)")
    after = await conn.fetchval("select count(*) from vtai_private.login_throttle")
    assert before - after == 20  # at most 20 per call: bounded
    for _ in range(2):
        await conn.fetchval("select public.vtai_login_attempt('exp', null)")
    assert (
        await conn.fetchval(
            "select count(*) from vtai_private.login_throttle where expires_at <= now()"
        )
        == 0
    )
    # Typed names are not stored, only their hash.
    assert not await conn.fetchval(
        "select count(*) from vtai_private.login_throttle where key like '%gone%'"
    )


async def test_throttle_tables_are_closed_to_api_roles(conn):
    for role in ("anon", "authenticated"):
        for statement in (
            "select * from vtai_private.login_throttle",
            "select * from vtai_private.login_sessions",
            "select public.vtai_login_attempt('x', null)",
            "select public.vtai_session_live(gen_random_uuid(), gen_random_uuid())",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                async with conn.transaction():
                    await conn.execute(f"set local role {role}")
                    await conn.execute(statement)
    for table in ("login_throttle", "login_sessions"):
        assert await conn.fetchval(
            "select relrowsecurity from pg_class where oid = $1::regclass",
            f"vtai_private.{table}",
        )


async def test_whitespace_variants_of_a_name_share_its_throttle(app, db):
    """Found by red-teaming: "alice\\t" and "alice\\u3000" log in as alice, so they must count
    as alice's guesses, not as fresh names, even from many addresses."""
    base, _ = app
    user = await add_user(db, f"w{uuid.uuid4().hex[:6]}")
    variants = [user.username + tail for tail in ("\t", "\n", "\u3000", "\u00a0", " ")]
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        for name in variants:
            r, _ = await attempt(http, name, "wrong guess", fake_addr())
            assert r.status_code == 401
    row = await key_row(db, user.username)
    assert row["attempts"] + row["refused"] == len(variants), dict(row)
