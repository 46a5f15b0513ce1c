"""One process's concurrent turns against a plan's caps, for tests/metering/test_plans.py.

Usage: python -m tests.metering.plans_worker SPEC_JSON
SPEC: {"db_url", "user_id", "ttl_seconds" (optional), "tasks": [{"model", "prices": [in, out]
| null, "now", "prompt", "max_completion", "turns": n | null}]}. Each task loops on its own:
reserve through the Gate, then write a ledger row (PostgresStore.record_batch) that uses the
whole grant, prompt plus max_tokens, at the prices reserved with, until it is refused (or
after `turns` turns).

The process opens its own pool, prints "ready", waits for a line on stdin (so that both
processes start their turns together), and prints one JSON line: grants and refusals.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections import Counter
from datetime import datetime
from decimal import Decimal

import asyncpg

from vtai.metering.gate import Gate
from vtai.metering.postgres import PostgresStore


def row_cost(prices: list[str] | None, prompt: int, completion: int) -> str:
    """USD of a row at exactly the prices reserved with (decimal strings, no float error)."""
    if prices is None:
        return "0"
    return str(Decimal(prices[0]) * prompt + Decimal(prices[1]) * completion)


async def task(gate: Gate, store: PostgresStore, user_id: uuid.UUID, spec: dict) -> Counter:
    seen: Counter = Counter()
    prices = spec.get("prices")
    now = datetime.fromisoformat(spec["now"])
    prompt = spec["prompt"]
    turns = spec.get("turns")
    while turns is None or seen["granted"] < turns:
        grant = await gate.reserve(
            user_id,
            prompt,
            spec["max_completion"],
            now,
            model=spec["model"],
            prices=(float(prices[0]), float(prices[1])) if prices else None,
        )
        seen[grant.reason] += 1
        if not grant.granted:
            break
        row = {
            "litellm_call_id": str(uuid.uuid4()),
            "created_at": now.isoformat(),
            "end_user": str(user_id),
            "session_id": "plans",
            "model": spec["model"],
            "status": "success",
            "prompt_tokens": prompt,
            "completion_tokens": grant.max_tokens,
            "total_cost": row_cost(prices, prompt, grant.max_tokens),
            "reservation_id": str(grant.reservation_id),
        }
        try:
            written = await store.record_batch([row])
        except Exception as exc:  # reported, and the test fails on it
            seen[f"record_error:{type(exc).__name__}"] += 1
            break
        if written != [True]:
            seen["record_not_new"] += 1
    return seen


async def main(spec: dict) -> dict:
    user_id = uuid.UUID(spec["user_id"])
    tasks = spec["tasks"]
    pool = await asyncpg.create_pool(spec["db_url"], min_size=len(tasks), max_size=len(tasks) + 2)
    try:
        gate = Gate(pool, ttl_seconds=spec.get("ttl_seconds", 900), timeout=30)
        store = PostgresStore(pool, timeout=30)
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        results = await asyncio.gather(*(task(gate, store, user_id, t) for t in tasks))
    finally:
        await pool.close()
    total: Counter = Counter()
    for r in results:
        total.update(r)
    return dict(total)


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(json.loads(sys.argv[1])))), flush=True)
