"""Kill the database mid-burst: every turn still ends as exactly one ledger row, counters equal
the ledger, and nobody ends over their limit. Real Postgres (its own embedded server, which the
test SIGKILLs and restarts) and the real LiteLLM path with mock_response."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from tests.conftest import make_settings
from tests.db.test_embedded import kill_postmaster
from vtai.db import accounts, migrations
from vtai.db import embedded as embedded_pg
from vtai.metering.turn import TurnRequest, TurnRunner
from vtai.services import Services

pytestmark = pytest.mark.slow


@pytest.fixture
def own_server(tmp_path):
    server = embedded_pg.start(tmp_path / "pg")
    yield server
    server.stop(force=True)


async def _setup(url: str, n_users: int, limit: int) -> list[uuid.UUID]:
    conn = await asyncpg.connect(url)
    try:
        await migrations.apply_pending(conn)
        await conn.execute("update tiers set token_limit = $1 where name = 'free'", limit)
        return [(await accounts.create_user(conn, f"u{i}", "pw-pw-pw")).id for i in range(n_users)]
    finally:
        await conn.close()


@pytest.mark.parametrize("fail_mode", ["closed", "open"])
async def test_database_killed_mid_burst(own_server, tmp_path, fail_mode):
    turns, limit = 200, 1200
    ids = await _setup(own_server.url, n_users=8, limit=limit)
    settings = make_settings(
        own_server.url, tmp_path / "app", gate_fail_mode=fail_mode, model="gpt-4o-mini"
    )
    services = await Services.start(settings, replay=False)
    runner = TurnRunner(
        services.gate,
        services.ledger,
        services.callback.notes,
        settings,
        {"mock_response": "a short answer"},
    )
    done = 0
    fifty_done = asyncio.Event()

    async def turn(i: int) -> str:
        nonlocal done
        await asyncio.sleep(0.01 * i)  # spread the burst over about two seconds
        req = TurnRequest(ids[i % len(ids)], f"chat-{i}", "gpt-4o-mini", [], f"question {i}")
        outcome = await runner.run(req, _ignore)
        done += 1
        if done == 50:
            fifty_done.set()
        return outcome.call_id

    async def chaos():
        await fifty_done.wait()
        await asyncio.to_thread(kill_postmaster, own_server.pid)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(own_server.restart)

    try:
        results = await asyncio.gather(*(turn(i) for i in range(turns)), chaos())
        call_ids = {c for c in results[:turns] if c}
        await services.flush()
        await runner.drain()
        await services.ledger.replayer.replay()
    finally:
        await services.stop()

    conn = await asyncpg.connect(own_server.url)
    try:
        logged = {
            r["litellm_call_id"]
            for r in await conn.fetch("select litellm_call_id from request_logs")
        }
        assert logged == call_ids and len(call_ids) == turns
        assert await conn.fetch("select * from vtai_verify_counters()") == []
        over = await conn.fetch(
            "select end_user, sum(total_tokens) as used from request_logs"
            " group by end_user having sum(total_tokens) > $1",
            limit,
        )
        if fail_mode == "closed":
            assert over == []
        statuses = {r["status"] for r in await conn.fetch("select status from request_logs")}
        assert "success" in statuses
    finally:
        await conn.close()


async def _ignore(_token: str) -> None:
    return None
