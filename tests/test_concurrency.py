"""The limit holds with many concurrent turns across two separate app processes."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest

from tests.browser import ROOT
from tests.conftest import add_user
from tests.metering.test_turn import wait_for_rows

pytestmark = pytest.mark.slow


async def test_two_processes_sharing_one_database_never_overshoot(db_url, conn, tmp_path):
    user = await add_user(conn)
    limit = 1500
    await conn.execute("update tiers set token_limit = $1 where name = 'free'", limit)
    turns = 40

    async def process(i):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.burst",
            db_url,
            str(user.id),
            str(turns),
            str(tmp_path / f"p{i}"),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        assert proc.returncode == 0
        return json.loads(out.decode().strip().splitlines()[-1])

    results = await asyncio.gather(process(1), process(2))
    assert await wait_for_rows(conn, 2 * turns, timeout=30) == 2 * turns
    answered = sum(r.get("answered", 0) for r in results)
    refused = sum(r.get("refused", 0) for r in results)
    assert answered > 0 and refused > 0 and answered + refused == 2 * turns, results
    total = await conn.fetchval("select sum(total_tokens) from request_logs")
    assert total <= limit
    assert await conn.fetch("select * from vtai_verify_counters()") == []
    assert await conn.fetchval("select reserved from usage_counters") == 0
    assert (
        await conn.fetchval("select count(distinct litellm_call_id) from request_logs") == 2 * turns
    )
