"""The durable spool: rows survive a dead database and are replayed exactly once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid

import asyncpg

from tests.conftest import add_user
from vtai.metering.gate import Gate
from vtai.metering.ledger import Ledger
from vtai.metering.postgres import is_bad_data
from vtai.metering.spool import ACTIVE, QUARANTINE, Spool


def make_row(user, grant=None, tokens=(10, 5)):
    return {
        "litellm_call_id": str(uuid.uuid4()),
        "end_user": str(user.id),
        "status": "success",
        "model": "m",
        "prompt_tokens": tokens[0],
        "completion_tokens": tokens[1],
        "reservation_id": str(grant.reservation_id) if grant else None,
    }


async def test_rows_spool_when_db_is_unreachable_and_replay_once(db_url, conn, tmp_path):
    user = await add_user(conn)
    spool = Spool(tmp_path / "spool")
    # A pool pointed at a port where nothing listens: the write fails like a dead database.
    dead = await asyncpg.create_pool("postgresql://u@127.0.0.1:1/x", min_size=0, max_size=1)
    rows = [make_row(user) for _ in range(5)]
    dead_ledger = Ledger(dead, spool)
    for r in rows:
        assert await dead_ledger.record(r) is None
    assert spool.status().waiting == 5
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    try:
        live = Ledger(pool, spool)
        result = await live.replayer.replay()
        assert (result.recorded, result.duplicates, result.quarantined) == (5, 0, 0)
        assert spool.status().waiting == 0
        # a second copy of the same rows (a crash after sending, before deleting) is harmless
        for r in rows:
            await dead_ledger.record(r)
        again = await live.replayer.replay()
        assert (again.recorded, again.duplicates) == (0, 5)
        assert await conn.fetchval("select count(*) from request_logs") == 5
        assert await conn.fetchval("select used from usage_counters") == 75
        assert await conn.fetch("select * from vtai_verify_counters()") == []
    finally:
        await pool.close()
        await dead.close()


async def test_corrupt_line_is_quarantined_and_later_lines_still_replay(db_url, conn, tmp_path):
    user = await add_user(conn)
    spool = Spool(tmp_path / "spool")
    spool.append(make_row(user))
    with (spool.directory / "ledger.jsonl").open("a") as f:
        f.write('{"litellm_call_id": "half-writ')  # a crash mid-write
        f.write("\n")
    spool.append(make_row(user))
    spool.append({**make_row(user), "end_user": "not-a-uuid"})  # the DB rejects this one
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    try:
        result = await Ledger(pool, spool).replayer.replay()
    finally:
        await pool.close()
    assert (result.recorded, result.quarantined) == (2, 2)
    assert spool.status().quarantined == 2
    kept = (spool.directory / QUARANTINE).read_text()
    assert "half-writ" in kept and "not-a-uuid" in kept


async def test_replay_settles_the_reservation(db_url, conn, tmp_path):
    user = await add_user(conn)
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    try:
        grant = await Gate(pool).reserve(user.id, 10, 100)
        spool = Spool(tmp_path / "spool")
        spool.append(make_row(user, grant))
        await Ledger(pool, spool).replayer.replay()
        c = await conn.fetchrow("select used, reserved from usage_counters")
        assert (c["used"], c["reserved"]) == (15, 0)
    finally:
        await pool.close()


def test_bad_data_is_told_apart_from_outage():
    assert is_bad_data(asyncpg.InvalidTextRepresentationError("bad uuid"))
    assert not is_bad_data(ConnectionRefusedError())


def test_rows_a_killed_process_left_in_flight_are_recovered_once(tmp_path):
    directory = tmp_path / "spool"
    # A process that holds two rows, settles one and dies with the other still in flight.
    script = (
        "import os, sys; from vtai.metering.spool import Spool; s = Spool(sys.argv[1]); "
        "s.hold({'litellm_call_id': 'settled'}).release(); s.hold({'litellm_call_id': 'lost'}); "
        "os.kill(os.getpid(), 9)"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(directory)], check=False)
    assert proc.returncode == -signal.SIGKILL
    (journal,) = (directory / "inflight").glob("*.jsonl")
    with journal.open("ab") as f:
        f.write(b'{"hold": 9, "ro\n')
    spool = Spool(directory)
    live = spool.hold({"litellm_call_id": "mine, still being written"})
    assert spool.recover_inflight() == 1
    assert (spool.status().waiting, spool.status().quarantined) == (1, 1)
    assert [r["litellm_call_id"] for r in _spooled(directory)] == ["lost"]
    # This process's own journal is locked while it lives: not recovered, not removed.
    assert Spool(directory).recover_inflight() == 0
    live.release()
    spool.close()
    assert list((directory / "inflight").iterdir()) == []


def _spooled(directory):
    return [json.loads(line) for line in (directory / ACTIVE).read_text().splitlines()]
