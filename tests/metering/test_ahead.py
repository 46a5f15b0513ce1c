"""Reserving a chat's next turn ahead: real gate, real Postgres, LiteLLM's mock_response."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

from tests.conftest import add_user
from tests.fake_provider import FakeProvider
from tests.metering.test_turn import MODEL, collect, request, runner_for, wait_for_rows
from vtai.metering.ahead import NEW_MESSAGE, NextTurn
from vtai.metering.turn import TurnRequest

ANSWER = "The quick brown fox jumps over the lazy dog."


def with_holder(req, holder):
    return dataclasses.replace(req, next_turn=holder)


async def until(check, timeout: float = 10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await check()
        if value or asyncio.get_running_loop().time() > deadline:
            return value
        await asyncio.sleep(0.02)


async def held_ids(conn) -> list[uuid.UUID]:
    return [r["id"] for r in await conn.fetch("select id from reservations order by created_at")]


async def one_held(conn) -> uuid.UUID:
    ids = await until(lambda: held_ids(conn))
    assert len(ids) == 1, ids
    return ids[0]


async def settled(conn, rows: int) -> None:
    assert await wait_for_rows(conn, rows) == rows
    assert await conn.fetch("select * from vtai_verify_counters()") == []


async def test_each_turn_spends_the_reservation_made_before_it(services, conn):
    user = await add_user(conn, tier="premium")
    runner = runner_for(services, mock_response=ANSWER)
    holder = runner.next_turn()
    runner.reserve_ahead(holder, user.id, MODEL, [])  # what opening a chat does
    first = await one_held(conn)
    amount = await conn.fetchval("select amount from reservations")
    # gpt-4o-mini is reserved at the byte bound, so a new message counts four bytes a token.
    assert 4 * NEW_MESSAGE + services.settings.max_tokens < amount < 2500

    history = []
    for turn in (1, 2):
        outcome, tokens = await collect(
            runner, with_holder(request(user, f"question {turn}", history=history), holder)
        )
        assert outcome.kind == "answered" and "".join(tokens) == ANSWER
        assert outcome.grant.reservation_id == first
        assert outcome.grant.max_tokens == services.settings.max_tokens
        history = outcome.history
        await settled(conn, turn)
        # The answer is settled, and the next turn's reservation is already there.
        nxt = await until(
            lambda first=first: conn.fetchval("select id from reservations where id <> $1", first)
        )
        assert nxt is not None and await held_ids(conn) == [nxt]
        first = nxt

    # It was sized for the longer chat: the history is in it.
    assert await conn.fetchval("select amount from reservations") > amount
    await holder.release()  # the chat closed
    assert await held_ids(conn) == []
    assert await conn.fetchval("select reserved from usage_counters") == 0
    await settled(conn, 2)


async def test_a_long_message_gives_it_back_and_reserves_its_own(services, conn):
    user = await add_user(conn, tier="premium")
    runner = runner_for(services, mock_response=ANSWER)
    holder = runner.next_turn()
    runner.reserve_ahead(holder, user.id, MODEL, [])
    ahead = await one_held(conn)
    long_text = "Please summarise this: " + "the cat sat on the mat and looked around. " * 60
    outcome, _ = await collect(runner, with_holder(request(user, long_text), holder))
    assert outcome.kind == "answered" and outcome.grant.reservation_id != ahead
    await settled(conn, 1)
    assert ahead not in await held_ids(conn)
    await holder.release()
    assert await conn.fetchval("select reserved from usage_counters") == 0


async def test_near_the_limit_no_tokens_are_held_ahead(services, conn):
    user = await add_user(conn)
    # Room for a few turns, but not for four of the reservations taken ahead.
    await conn.execute("update tiers set token_limit = 3000 where name = 'free'")
    runner = runner_for(services, mock_response=ANSWER)
    holder = runner.next_turn()
    runner.reserve_ahead(holder, user.id, MODEL, [])
    assert await holder.take(user.id, 10, 10, MODEL) is None  # reserved, then given straight back
    assert await held_ids(conn) == []
    assert await conn.fetchval("select reserved from usage_counters") == 0
    outcome, _ = await collect(runner, with_holder(request(user), holder))
    assert outcome.kind == "answered" and outcome.grant.reservation_id
    await settled(conn, 1)
    await asyncio.sleep(0.2)
    assert await held_ids(conn) == []


async def test_a_reservation_near_its_ttl_is_not_spent(services, conn):
    user = await add_user(conn, tier="premium")
    now = [1000.0]
    holder = NextTurn(services.gate, ttl_seconds=900, request_timeout=120, clock=lambda: now[0])
    holder.prepare(user.id, lambda: (50, 100), MODEL, lambda: None)
    ahead = await one_held(conn)
    # Time for a turn, but the database may expire it before the turn would settle.
    now[0] += 900 - 120 - 29
    assert await holder.take(user.id, 10, 10, MODEL) is None
    assert ahead not in await held_ids(conn)
    assert await conn.fetchval("select reserved from usage_counters") == 0

    holder.prepare(user.id, lambda: (50, 100), MODEL, lambda: None)
    ahead = await one_held(conn)
    now[0] += 900 - 120 - 31
    grant = await holder.take(user.id, 40, 100, MODEL)
    assert grant.reservation_id == ahead and grant.max_tokens == 100
    # Bigger than what is held: given back, the caller reserves.
    holder.prepare(user.id, lambda: (50, 100), MODEL, lambda: None)
    ahead2 = await until(lambda: conn.fetchval("select id from reservations where id <> $1", ahead))
    assert await holder.take(user.id, 60, 100, MODEL) is None
    assert ahead2 not in await held_ids(conn)


async def test_a_new_reservation_replaces_the_old_one(services, conn):
    user = await add_user(conn, tier="premium")
    holder = services.runner.next_turn()
    holder.prepare(user.id, lambda: (50, 100), MODEL, lambda: None)
    first = await one_held(conn)
    holder.prepare(user.id, lambda: (60, 100), MODEL, lambda: None)
    second = await until(lambda: conn.fetchval("select id from reservations where id <> $1", first))
    assert await until(lambda: _only(conn, second))
    await holder.release()
    assert await held_ids(conn) == []
    assert await conn.fetchval("select reserved from usage_counters") == 0


async def _only(conn, rid) -> bool:
    return await held_ids(conn) == [rid]


async def test_many_chats_of_one_user_never_pass_the_limit(services, conn):
    # A provider that honours max_tokens (LiteLLM's mock doesn't), over LiteLLM's HTTP path.
    provider = FakeProvider().start()
    user = await add_user(conn)
    # Reservations ahead hold a provider's byte bound (about 1,900 tokens here) and are kept
    # only while four times that is left. The provider bills by its own byte tokenizer.
    limit = 20_000
    await conn.execute("update tiers set token_limit = $1 where name = 'free'", limit)
    runner = runner_for(services, "openai/fake", api_base=provider.url("bytes"), api_key="sk-test")
    holders = [runner.next_turn() for _ in range(6)]
    for h in holders:
        runner.reserve_ahead(h, user.id, "openai/fake", [])
    spent_ahead = set()

    async def chat(i: int, holder: NextTurn) -> list[str]:
        kinds, history = [], []
        for k in range(300):
            text = f"chat {i} turn {k}"
            req = TurnRequest(user.id, f"c{i}", "openai/fake", history, text, holder)
            ahead = await _held_id(holder)
            outcome, _ = await collect(runner, req)
            kinds.append(outcome.kind)
            if outcome.kind != "answered":
                break
            if ahead == outcome.grant.reservation_id:
                spent_ahead.add(ahead)
            history = outcome.history[-4:]
        return kinds

    try:
        results = await asyncio.gather(*(chat(i, h) for i, h in enumerate(holders)))
        await asyncio.gather(*(h.release() for h in holders))
        await runner.drain()
    finally:
        provider.stop()
    assert all(kinds[-1] == "refused" for kinds in results), results
    # Far from the limit turns spent reservations made ahead; near it they reserved their own.
    assert len(spent_ahead) >= 3
    answered = sum(kinds.count("answered") for kinds in results)
    assert answered > len(spent_ahead)
    refused = sum(kinds.count("refused") for kinds in results)
    await settled(conn, answered + refused)
    used = await conn.fetchval("select used from usage_counters")
    # In-flight reservations can refuse a turn before the last tokens are used: never after.
    assert limit // 2 < used <= limit
    assert await conn.fetchval("select reserved from usage_counters") == 0
    assert await held_ids(conn) == []


async def _held_id(holder: NextTurn) -> uuid.UUID | None:
    """Wait for the reservation being made ahead: what a user typing for a second allows."""
    if holder._task is None:
        return None
    held = await asyncio.shield(holder._task)
    return held.grant.reservation_id if held else None


async def test_reserve_ahead_off_reserves_at_each_turn(db_url, tmp_path, conn):
    from tests.conftest import make_settings
    from vtai.services import Services

    s = await Services.start(make_settings(db_url, tmp_path, reserve_ahead=False), replay=False)
    try:
        assert s.runner.next_turn() is None
        user = await add_user(conn)
        outcome, _ = await collect(runner_for(s, mock_response=ANSWER), request(user))
        assert outcome.kind == "answered"
        await settled(conn, 1)
        assert await held_ids(conn) == []
    finally:
        await s.stop()


async def test_stopping_the_app_gives_open_chats_reservations_back(db_url, tmp_path, conn):
    from tests.conftest import make_settings
    from vtai.services import Services

    s = await Services.start(make_settings(db_url, tmp_path), replay=False)
    user = await add_user(conn, tier="premium")
    holders = [s.runner.next_turn() for _ in range(3)]
    for h in holders:
        s.runner.reserve_ahead(h, user.id, MODEL, [])
    assert len(await until(lambda: _count(conn, 3))) == 3
    await s.stop()
    assert await held_ids(conn) == []
    assert await conn.fetchval("select reserved from usage_counters") == 0


async def _count(conn, n: int) -> list:
    ids = await held_ids(conn)
    return ids if len(ids) == n else []


async def test_release_is_idempotent_and_only_the_owners(services, conn):
    user, other = await add_user(conn), await add_user(conn)
    grant = await services.gate.reserve(user.id, 10, 20)
    assert await services.gate.release(grant.reservation_id, other.id) is False
    assert await conn.fetchval("select reserved from usage_counters") == 30
    assert await services.gate.release(grant.reservation_id, user.id) is True
    assert await services.gate.release(grant.reservation_id, user.id) is False
    assert await conn.fetchval("select reserved from usage_counters") == 0
    assert await conn.fetch("select * from vtai_verify_counters()") == []


async def test_a_plan_change_gives_back_what_chats_hold_ahead(services, conn):
    """Held reservations were granted under the old plan: a change to a tier (NOTIFY from
    the database, heard by vtai.metering.plan_watch) gives them back at once."""
    user = await add_user(conn)
    runner = runner_for(services, mock_response=ANSWER)
    holder = runner.next_turn()
    assert holder is not None and services.runner.plan_watch.live
    runner.reserve_ahead(holder, user.id, MODEL, [])
    await holder._task
    held = await conn.fetchval("select count(*) from reservations where end_user = $1", user.id)
    assert held == 1
    services.runner.plan_watch.on_change = runner.plans_changed  # this runner hears it
    await conn.execute("update tiers set daily_limit = null where name = 'free'")
    async with asyncio.timeout(10):
        while True:
            held = await conn.fetchval(
                "select count(*) from reservations where end_user = $1", user.id
            )
            if not held:
                break
            await asyncio.sleep(0.05)
    assert await holder.take(user.id, 10, 10, MODEL) is None
