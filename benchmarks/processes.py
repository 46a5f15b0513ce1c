"""Many app processes on one database: throughput, overshoot and deadlocks.

Four worker processes, each a full `Services` (pool, gate, ledger, LiteLLM callback) talking
to the fake OpenAI-compatible provider from the tests (it honours `max_tokens` and reports
usage, as real providers do; LiteLLM's `mock_response` ignores `max_tokens`, so it could
"overshoot" on the provider's behalf). 200 users: most chat in one process; the limited ones
(a small tier) chat in all four at once, so their turns race across processes for the same
counter. Users send their next message as soon as the answer is in; a refused user waits
0.2 s before trying again.

    python benchmarks/processes.py [--db-url URL] [--processes 4] [--users 200] [--seconds 20]
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg  # noqa: E402

from benchmarks import common  # noqa: E402

SCRIPT = str(Path(__file__).resolve())
SMALL_TIER, SMALL_LIMIT = "bench_small", 400


async def worker(db_url: str, plan: dict, seconds: float, data_dir: Path) -> dict:
    from tests.fake_provider import FakeProvider
    from vtai.metering.turn import TurnRequest, TurnRunner
    from vtai.services import Services
    from vtai.settings import Settings

    provider = FakeProvider().start()
    settings = Settings(database_url=db_url, data_dir=data_dir, model="openai/fake")
    services = await Services.start(settings, replay=False, pool_size=10)
    runner = TurnRunner(
        services.gate,
        services.ledger,
        services.callback.notes,
        settings,
        call_options={"api_base": provider.url("ok"), "api_key": "sk-test"},
    )
    kinds: dict[str, int] = {}
    # First calls load the tokenizer, LiteLLM's HTTP client and the pool: not part of the run.
    await warm_up(runner, provider.url("ok"))
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    deadline = time.monotonic() + seconds

    async def ignore(_token: str) -> None:
        return None

    async def session(user: uuid.UUID, i: int) -> None:
        k = 0
        while time.monotonic() < deadline:
            req = TurnRequest(user, f"chat-{i}", "openai/fake", [], f"question {k} from {i}")
            kind = (await runner.run(req, ignore)).kind
            kinds[kind] = kinds.get(kind, 0) + 1
            k += 1
            if kind == "refused":
                await asyncio.sleep(0.2)

    try:
        t0 = time.monotonic()
        users = [uuid.UUID(u) for u in plan["users"]]
        await asyncio.gather(*(session(u, i) for i, u in enumerate(users)))
        elapsed = time.monotonic() - t0
        await services.flush()
        # Rows whose write failed or timed out went to the spool, which the app replays in the
        # background; this benchmark starts with replay off, so replay them here, and count.
        spooled = await services.ledger.replayer.replay()
    finally:
        await services.stop()
        provider.stop()
    return {
        "kinds": kinds,
        "seconds": elapsed,
        "sessions": len(plan["users"]),
        "spooled": spooled.recorded + spooled.duplicates,
    }


async def warm_up(runner, api_base: str) -> None:
    import litellm

    from vtai.metering.turn import count_prompt

    count_prompt("openai/fake", [{"role": "user", "content": "hello"}])
    await runner.gate.pool.fetchval("select 1")
    for _ in range(3):
        stream = await litellm.acompletion(
            model="openai/fake",
            messages=[{"role": "user", "content": "hello"}],
            stream=True,
            api_base=api_base,
            api_key="sk-test",
        )
        async for _chunk in stream:
            pass


async def bench(
    db_url: str, processes: int, users: int, limited: int, seconds: float
) -> common.Section:
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(
            "insert into tiers (name, token_limit, rank) values ($1, $2, 8)"
            " on conflict (name) do update set token_limit = excluded.token_limit",
            SMALL_TIER,
            SMALL_LIMIT,
        )
        small = await common.add_users(conn, limited, SMALL_TIER)
        big = await common.add_users(conn, users - limited)
        db = await conn.fetchval("select current_database()")
        deadlocks0 = await conn.fetchval(
            "select deadlocks from pg_stat_database where datname = $1", db
        )
        rows0 = await conn.fetchval("select count(*) from request_logs")
        random.shuffle(big)
        plans = [
            {"users": [str(u) for u in big[p::processes]] + [str(u) for u in small]}
            for p in range(processes)
        ]
        with tempfile.TemporaryDirectory() as tmp:
            procs = []
            for p, plan in enumerate(plans):
                plan_file = Path(tmp) / f"plan{p}.json"
                plan_file.write_text(json.dumps(plan))
                procs.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        SCRIPT,
                        "--worker",
                        str(plan_file),
                        "--db-url",
                        db_url,
                        "--seconds",
                        str(seconds),
                        stdin=asyncio.subprocess.PIPE,
                        stdout=asyncio.subprocess.PIPE,
                    )
                )
            # Start together, once every process has warmed up.
            for proc in procs:
                assert (await proc.stdout.readline()).strip() == b"ready"
            outs = await asyncio.gather(*(p.communicate(b"go\n") for p in procs))
        results = []
        for proc, (out, _) in zip(procs, outs, strict=True):
            assert proc.returncode == 0, f"worker exited {proc.returncode}"
            results.append(json.loads(out.decode().strip().splitlines()[-1]))
        kinds: dict[str, int] = {}
        for r in results:
            for k, v in r["kinds"].items():
                kinds[k] = kinds.get(k, 0) + v
        turns = sum(kinds.values())
        # Every turn writes one row, answered or refused; wait for stragglers.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if await conn.fetchval("select count(*) from request_logs") - rows0 >= turns:
                break
            await asyncio.sleep(0.1)
        rows = await conn.fetchval("select count(*) from request_logs") - rows0
        overshoot = await conn.fetchval(
            "select coalesce(sum(greatest(l.used - t.token_limit, 0)), 0) from ("
            "  select end_user, period_start, sum(total_tokens) as used from request_logs"
            "  where end_user is not null group by 1, 2) l"
            " join profiles p on p.id = l.end_user join tiers t on t.name = p.tier"
            " where t.token_limit is not null"
        )
        at_limit = await conn.fetchval(
            "select count(distinct end_user) from request_logs where status = 'refused'"
            " and additional_details ->> 'reason' in ('quota_exhausted', 'prompt_exceeds_quota')"
        )
        deadlocks = (
            await conn.fetchval("select deadlocks from pg_stat_database where datname = $1", db)
            - deadlocks0
        )
        data = {
            "kinds": kinds,
            "turns": turns,
            "rows": rows,
            "overshoot": overshoot,
            "deadlocks": deadlocks,
            "at_limit": at_limit,
            "limited": limited,
            "reserved": await conn.fetchval(
                "select coalesce(sum(reserved), 0) from usage_counters"
            ),
            "counters_exact": await common.counters_exact(conn),
            "seconds": max(r["seconds"] for r in results),
            "sessions": sum(r["sessions"] for r in results),
            "spooled": sum(r["spooled"] for r in results),
        }
    finally:
        await conn.close()
    return section(processes, users, limited, seconds, data)


def section(processes, users, limited, seconds, data) -> common.Section:
    k = data["kinds"]
    rate = data["turns"] / data["seconds"]
    rows = [
        [
            processes,
            users,
            data["sessions"],
            f"{data['seconds']:.1f}",
            f"{data['turns']:,}",
            f"{k.get('answered', 0):,}",
            f"{k.get('refused', 0):,}",
            f"{k.get('failed', 0):,}",
            f"{rate:,.0f}",
            data["overshoot"],
            data["deadlocks"],
        ]
    ]
    targets = [
        common.Target("overshoot (tokens over a limit)", "0", str(data["overshoot"]),
                      data["overshoot"] == 0, "a bug: the gate let turns through"),
        common.Target("deadlocks (pg_stat_database)", "0", str(data["deadlocks"]),
                      data["deadlocks"] == 0, "a lock-order bug"),
    ]  # fmt: skip
    notes = [
        f"{limited} of the {users} users are on a {SMALL_LIMIT:,}-token tier and chat in all "
        f"{processes} processes at once; {data['at_limit']} users were refused for quota at "
        "least once. The others have one session each.",
        f"Ledger rows: {data['rows']:,} for {data['turns']:,} turns; counters equal the "
        f"ledger: {data['counters_exact']}; tokens still reserved: {data['reserved']}. "
        f"{data['spooled']:,} rows reached the database only through the spool: their write "
        "failed or exceeded the ledger's 5 s timeout (pool of 10 per process, CPU saturated) "
        "and the replay, which the app runs in the background, wrote them afterwards.",
        "Throughput is turns (answered + refused) per second over all processes; each answer "
        "streams ~15 chunks from the fake provider over loopback HTTP, so this is a CPU-bound "
        f"figure for {processes} processes + Postgres + the fake provider sharing 2 cores.",
    ]
    return common.Section(
        "Many app processes",
        f"python benchmarks/processes.py --processes {processes} --users {users} "
        f"--limited {limited} --seconds {seconds:g}",
        [
            "processes",
            "users",
            "sessions",
            "seconds",
            "turns",
            "answered",
            "refused",
            "failed",
            "turns/s",
            "overshoot",
            "deadlocks",
        ],  # fmt: skip
        rows,
        notes,
        targets,
        data,
    )


async def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--limited", type=int, default=40, help="users on the small tier")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--worker", type=Path, help=argparse_hidden())
    args = p.parse_args()
    if args.worker:
        plan = json.loads(args.worker.read_text())
        with common.data_dir() as tmp:
            result = await worker(args.db_url, plan, args.seconds, tmp)
        print(json.dumps(result), flush=True)
        return
    async with common.database(args.db_url) as url:
        result = await bench(url, args.processes, args.users, args.limited, args.seconds)
    common.finish(result, args.json)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    asyncio.run(main())
