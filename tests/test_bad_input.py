"""Bad input and a database that is down: a clear message, nothing lost, nothing crashed."""

from __future__ import annotations

import asyncio
import json
import uuid

import asyncpg
import pytest

from tests.conftest import add_user, make_settings, offering
from tests.fake_provider import FakeProvider
from tests.metering.test_turn import collect, request, runner_for, wait_for_rows
from vtai.db import accounts
from vtai.metering.content import redact_secrets
from vtai.metering.gate import Gate
from vtai.metering.ledger import Ledger
from vtai.metering.logger import CallNotes, MeteringLogger
from vtai.metering.spool import Spool
from vtai.metering.turn import TurnRequest, TurnRunner
from vtai.services import register_callback, unregister_callback


async def test_megabyte_message_is_refused_before_the_model(services, conn):
    user = await add_user(conn)
    runner = runner_for(services, mock_response="never sent")
    outcome, tokens = await collect(runner, request(user, "x" * 1_000_000))
    assert outcome.kind == "refused" and not tokens
    assert "over the 32,000-character limit" in outcome.notice and "shorten it" in outcome.notice
    await wait_for_rows(conn, 1)
    r = await conn.fetchrow(
        "select status, total_tokens, additional_details, messages from request_logs"
    )
    assert r["status"] == "refused" and r["total_tokens"] == 0
    details = json.loads(r["additional_details"])
    assert details["reason"] == "message_too_long" and details["chars"] == 1_000_000
    assert "xxxx" not in (r["messages"] or "")  # its size and hash, never the text
    assert await conn.fetchval("select coalesce(sum(used + reserved), 0) from usage_counters") == 0


async def test_long_conversation_is_trimmed_and_the_user_told(services, conn):
    user = await add_user(conn)
    history = []
    for i in range(200):  # far more than the local model's 2,048-token window
        history += [
            {"role": "user", "content": f"question {i} " * 10},
            {"role": "assistant", "content": f"answer {i} " * 10},
        ]
    runner = runner_for(services, mock_response="fine")
    req = TurnRequest(user.id, "chat", "local/smollm2-135m", history, "and now?")
    outcome, _ = await collect(runner, req)
    assert outcome.kind == "answered" and outcome.trimmed > 0
    assert "oldest" in outcome.notice and "left out" in outcome.notice
    kept = outcome.history[:-2]
    assert kept == history[len(history) - len(kept) :]  # the newest turns are the ones kept
    assert kept[0]["role"] == "user"


async def test_secrets_never_reach_the_error_row(services, conn, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-live-abcdefghijklmnop")
    assert "abcdefgh" not in redact_secrets("bad key sk-live-abcdefghijklmnop given")
    assert "[redacted" in redact_secrets("Incorrect API key provided: sk-proj-123456789")
    provider = FakeProvider().start()
    try:
        user = await add_user(conn)
        runner = TurnRunner(
            services.gate,
            services.ledger,
            services.callback.notes,
            offering(services.settings, "openai/fake"),
            call_options={
                "api_base": provider.url("401"),
                "max_retries": 0,
                "api_key": "sk-live-abcdefghijklmnop",
            },
        )
        outcome, _ = await collect(runner, TurnRequest(user.id, "c", "openai/fake", [], "hi"))
        await wait_for_rows(conn, 1)
        await services.runner.drain()
        stored = await conn.fetchval("select error::text from request_logs")
        assert "abcdefghijklmnop" not in stored and "sk-fake" not in stored
        assert "abcdefghijklmnop" not in outcome.notice
    finally:
        provider.stop()


async def test_failed_logins_are_slowed(db_url, conn):
    await add_user(conn, "mallory")
    throttle = accounts.LoginThrottle()
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    try:
        for _ in range(4):
            assert await accounts.authenticate(pool, "mallory", "guess", throttle) is None
        assert throttle.delay("mallory") >= 1.0
        assert throttle.delay("someone-else") == 0
        ok = await accounts.authenticate(pool, "mallory", "correct horse battery", throttle)
        assert ok is not None and ok.username == "mallory"
        assert throttle.delay("mallory") == 0
        assert await accounts.authenticate(pool, "nobody", "x", throttle) is None
    finally:
        await pool.close()


DEAD_DB = "postgresql://u@127.0.0.1:1/x"


async def test_gate_closed_refuses_clearly_when_the_database_is_down(tmp_path):
    dead = await asyncpg.create_pool(DEAD_DB, min_size=0, max_size=1)
    try:
        settings = make_settings(DEAD_DB, tmp_path, model="gpt-4o-mini")
        gate = Gate(dead, fail_mode="closed", timeout=2)
        ledger = Ledger(dead, Spool(tmp_path / "spool"))
        runner = TurnRunner(gate, ledger, CallNotes(), settings, {"mock_response": "x"})
        outcome, tokens = await collect(runner, request(type("U", (), {"id": uuid.uuid4()})()))
        await runner.drain()
    finally:
        await dead.close()
    assert outcome.kind == "refused" and not tokens
    assert (
        "usage service is unavailable" in outcome.notice and "try again shortly" in outcome.notice
    )
    assert Spool(tmp_path / "spool").status().waiting == 1  # the refusal itself is not lost


async def test_gate_open_answers_and_charges_once_the_database_is_back(db_url, conn, tmp_path):
    user = await add_user(conn)
    dead = await asyncpg.create_pool(DEAD_DB, min_size=0, max_size=1)
    spool = Spool(tmp_path / "spool")
    settings = make_settings(DEAD_DB, tmp_path, gate_fail_mode="open", model="gpt-4o-mini")
    notes = CallNotes()
    down = Ledger(dead, spool, timeout=2)
    callback = MeteringLogger(down, notes=notes)
    register_callback(callback)
    try:
        runner = TurnRunner(
            Gate(dead, fail_mode="open", timeout=2),
            down,
            notes,
            settings,
            {"mock_response": "answered anyway"},
        )
        outcome, _ = await collect(runner, request(user))
        for _ in range(100):  # LiteLLM's logging worker spools the row shortly after
            if spool.status().waiting:
                break
            await asyncio.sleep(0.1)
    finally:
        unregister_callback(callback)
        await dead.close()
    assert outcome.kind == "answered" and outcome.reply == "answered anyway"
    assert spool.status().waiting == 1
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    try:
        assert (await Ledger(pool, spool).replayer.replay()).recorded == 1
        row = await conn.fetchrow("select status, total_tokens from request_logs")
        assert row["status"] == "success" and row["total_tokens"] > 0
        used = await conn.fetchval("select used from usage_counters where end_user = $1", user.id)
        assert used == row["total_tokens"]
    finally:
        await pool.close()


@pytest.mark.parametrize("text", ["", "   ", "\n\t\n"])
async def test_empty_messages_are_explained(services, conn, text):
    user = await add_user(conn)
    outcome, _ = await collect(runner_for(services, mock_response="x"), request(user, text))
    assert outcome.kind == "invalid" and outcome.notice.startswith("Empty message")
    await asyncio.sleep(0)
