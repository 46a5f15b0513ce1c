"""SIGKILL the app process mid-burst, restart it on the same data dir: nothing is charged twice,
no reservation stays held, nobody ends over their limit, and every turn that finished before
the kill is in the ledger or the spool.

The app is a real process (Services + TurnRunner + LiteLLM's HTTP path against the FAKE
provider in tests/fake_provider.py) writing to a real Postgres. The same module is the app:
`python -m tests.test_app_kill burst|restart ...`, so benchmarks/faults.py can reuse it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import litellm
import pytest

from tests.conftest import ROOT, create_database, drop_database, make_settings, offering
from tests.fake_provider import FakeProvider
from vtai.db import accounts
from vtai.metering.gate import Gate
from vtai.metering.ledger import Ledger
from vtai.metering.spool import QUARANTINE, Spool
from vtai.metering.turn import TurnRequest, TurnRunner
from vtai.services import Services

pytestmark = pytest.mark.slow

# The smallest TTL Settings accepts; the test moves the gate's clock past it instead of waiting.
TTL = 10
MODEL = "openai/fake"


def app_settings(db_url: str, data_dir: Path):
    # lifetime: the clock jump past the TTL can't land in another period's counter
    return make_settings(
        db_url, data_dir, reservation_ttl=TTL, usage_period="lifetime", max_tokens=32
    )


async def _ignore(_token: str) -> None:
    return None


async def burst_main(db_url: str, data_dir: Path, turns: int, spacing: float, ids: list[str]):
    """The app under test: one line per finished turn, flushed before the next thing happens,
    so the killer knows exactly which turns the user saw finish."""
    provider = FakeProvider().start()
    services = await Services.start(app_settings(db_url, data_dir), replay=False)
    options = {"api_base": provider.url("ok"), "api_key": "sk-test", "max_retries": 0}
    runner = TurnRunner(
        services.gate,
        services.ledger,
        services.callback.notes,
        offering(services.settings, MODEL),
        call_options=options,
    )
    # A process's first LiteLLM call pays for imports and the HTTP client: about 0.85 s here,
    # more on a busy machine. Until it is paid every answer is slower than every refusal, and
    # the first `kill_after` turns to finish could all be refusals. Without VT.ai's metadata
    # the call is not metered.
    warm_up = await litellm.acompletion(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True, **options
    )
    async for _chunk in warm_up:
        pass
    print("ready", flush=True)

    async def one(i: int) -> None:
        await asyncio.sleep(spacing * i)
        user = uuid.UUID(ids[i % len(ids)])
        req = TurnRequest(user, f"chat-{i}", MODEL, [], f"question {i}")
        outcome = await runner.run(req, _ignore)
        tokens = outcome.usage.get("total_tokens", 0)
        print(f"done {outcome.kind} {outcome.call_id} {tokens}", flush=True)

    await asyncio.gather(*(one(i) for i in range(turns)))
    await asyncio.sleep(1.0)
    await runner.drain()
    print("finished", flush=True)
    await services.stop()
    provider.stop()


async def restart_main(db_url: str, data_dir: Path) -> None:
    """A fresh app on the same data dir replays the spool first, as start-up does."""
    services = await Services.start(app_settings(db_url, data_dir), replay=False)
    try:
        await services.ledger.replayer.recover()
        replayed = await services.ledger.replayer.replay()
        status = services.ledger.spool.status()
        print(
            json.dumps(
                {
                    "replayed": replayed.recorded,
                    "duplicates": replayed.duplicates,
                    "waiting": status.waiting,
                    "quarantined": status.quarantined,
                }
            )
        )
    finally:
        await services.stop()


@dataclass
class KillResult:
    turns: int
    killed_after: int
    finished: dict[str, tuple[str, int]] = field(default_factory=dict)  # call id -> kind, tokens
    rows_before_restart: int = 0
    restart: dict = field(default_factory=dict)
    logged: dict[str, int] = field(default_factory=dict)  # call id -> total_tokens
    duplicates: int = 0
    mismatches: list = field(default_factory=list)
    reserved_after_expiry: int = 0
    over_limit: list = field(default_factory=list)
    kill_to_exit: float = 0.0

    @property
    def lost(self) -> list[str]:
        return sorted(set(self.finished) - set(self.logged))

    @property
    def tokens_expected(self) -> int:
        return sum(tokens for _, tokens in self.finished.values())

    @property
    def tokens_found(self) -> int:
        return sum(self.logged.get(c, 0) for c in self.finished)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def setup_users(db_url: str, n: int, limit: int) -> list[uuid.UUID]:
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute("update tiers set token_limit = $1 where name = 'free'", limit)
        return [
            (await accounts.create_user(conn, f"k{uuid.uuid4().hex[:8]}", "pw-pw-pw")).id
            for _ in range(n)
        ]
    finally:
        await conn.close()


async def kill_mid_burst(
    db_url: str,
    data_dir: Path,
    user_ids: list[uuid.UUID],
    limit: int,
    turns: int = 300,
    kill_after: int = 100,
    spacing: float = 0.01,
) -> KillResult:
    """Run the app, SIGKILL it right after `kill_after` turns have finished, restart it, expire
    the orphaned reservations by moving the gate's clock, and collect what the ledger says."""
    result = KillResult(turns=turns, killed_after=kill_after)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.test_app_kill",
        "burst",
        db_url,
        str(data_dir),
        str(turns),
        str(spacing),
        *map(str, user_ids),
        cwd=ROOT,
        env=_env(),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        killed_at = None
        while True:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=120)
            if not line:
                break
            parts = line.decode().split()
            if parts and parts[0] == "done":
                result.finished[parts[2]] = (parts[1], int(parts[3]))
                if killed_at is None and len(result.finished) >= kill_after:
                    # At once: turns whose success hook is still queued in LiteLLM die with it.
                    proc.send_signal(signal.SIGKILL)
                    killed_at = time.monotonic()
        await proc.wait()
        if killed_at is not None:
            result.kill_to_exit = time.monotonic() - killed_at
        assert proc.returncode == -signal.SIGKILL, "the burst ended before it could be killed"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    conn = await asyncpg.connect(db_url)
    try:
        result.rows_before_restart = await conn.fetchval("select count(*) from request_logs")
        restart = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.test_app_kill",
            "restart",
            db_url,
            str(data_dir),
            cwd=ROOT,
            env=_env(),
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(restart.communicate(), timeout=90)
        assert restart.returncode == 0
        result.restart = json.loads(out.decode().strip().splitlines()[-1])

        # The orphans' TTL has "passed": the next reserve for each user gives their quota back.
        # A prompt larger than any limit makes it refuse, so it holds nothing itself.
        pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
        try:
            gate = Gate(pool, "lifetime", TTL)
            later = datetime.now(UTC) + timedelta(seconds=TTL + 5)
            for user in user_ids:
                grant = await gate.reserve(user, 10**9, 1, now=later)
                assert not grant.granted
        finally:
            await pool.close()

        rows = await conn.fetch("select litellm_call_id, total_tokens from request_logs")
        result.logged = {r["litellm_call_id"]: r["total_tokens"] for r in rows}
        result.duplicates = len(rows) - len(result.logged)
        result.mismatches = [
            dict(r) for r in await conn.fetch("select * from vtai_verify_counters()")
        ]
        result.reserved_after_expiry = await conn.fetchval(
            "select coalesce(sum(reserved), 0) from usage_counters"
        )
        result.over_limit = [
            dict(r)
            for r in await conn.fetch(
                "select end_user, used from usage_counters where used > $1", limit
            )
        ]
    finally:
        await conn.close()
    return result


LIMIT = 1000


@pytest.fixture(scope="module")
async def killed(pg_server, template_db, tmp_path_factory):
    """One kill-and-restart, shared by the tests below (it takes about 15 s)."""
    url = await create_database(pg_server, template_db)
    try:
        ids = await setup_users(url, n=5, limit=LIMIT)
        data = tmp_path_factory.mktemp("killed") / "app"
        yield await kill_mid_burst(url, data, ids, LIMIT, turns=300, kill_after=100), data
    finally:
        await drop_database(pg_server, url)


async def test_restart_charges_nothing_twice_and_frees_orphaned_reservations(killed):
    r, data = killed
    assert r.duplicates == 0 and r.mismatches == []
    assert r.reserved_after_expiry == 0
    assert r.over_limit == []
    assert (r.restart["waiting"], r.restart["quarantined"]) == (0, 0)
    assert not (data / "spool" / QUARANTINE).exists()
    kinds = {kind for kind, _ in r.finished.values()}
    assert "answered" in kinds and len(r.finished) < r.turns


async def test_every_turn_finished_before_the_kill_has_its_row(killed):
    r, _ = killed
    lost = r.lost
    assert not lost, (
        f"{len(lost)} of {len(r.finished)} turns that finished before the kill have no ledger row "
        f"({sum(r.finished[c][1] for c in lost)} tokens unbilled); kinds: "
        f"{sorted({r.finished[c][0] for c in lost})}; rows at kill: {r.rows_before_restart}"
    )


async def test_a_row_that_cannot_get_a_connection_is_spooled_within_the_timeout(db_url, tmp_path):
    """The success hook runs under LiteLLM's LoggingWorker, which cancels it after 20 s
    (LOGGING_WORKER_MAX_TIME_PER_COROUTINE); a cancelled hook neither writes nor spools its row.
    So a write must give up and spool within Ledger.timeout even when every pooled connection is
    busy (a burst, or connections wedged on a half-dead server)."""
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=1)
    spool = Spool(tmp_path / "spool")
    ledger = Ledger(pool, spool, timeout=1.0)
    row = {"litellm_call_id": str(uuid.uuid4()), "end_user": str(uuid.uuid4()), "status": "success"}
    try:
        async with pool.acquire():
            try:
                result = await asyncio.wait_for(ledger.record(row), timeout=5)
            except TimeoutError:
                result = "still waiting for a connection after 5 s"
    finally:
        pool.terminate()
    assert result is None and spool.status().waiting == 1, result


if __name__ == "__main__":
    command, url, data = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    if command == "burst":
        n, spacing, users_ = int(sys.argv[4]), float(sys.argv[5]), sys.argv[6:]
        asyncio.run(burst_main(url, data, n, spacing, users_))
    else:
        asyncio.run(restart_main(url, data))
