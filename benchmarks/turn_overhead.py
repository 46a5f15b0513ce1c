"""What metering adds to a chat turn: the full TurnRunner path against a bare LiteLLM stream.

Both sides use LiteLLM's `mock_response` (a model that answers instantly), so the difference
is VT.ai's work: counting the prompt, the gate's round trip, the call's metadata, and the
callback's row building and ledger write, which run on the same event loop.

Users arrive at a fixed total rate (default 20 turns/s): each of N users sends a message,
reads the answer, thinks for about N/rate seconds and sends the next. Latency is from sending
the message to `run()` returning with the whole answer streamed.

    python benchmarks/turn_overhead.py [--db-url URL] [--users 1,50,200] [--turns 2000]
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# Before `import litellm`, which otherwise fetches a price list over the network.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import asyncpg  # noqa: E402
import litellm  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.common import ms, pct  # noqa: E402
from vtai.db import Database  # noqa: E402
from vtai.gate import Gate  # noqa: E402
from vtai.services import Services, register_callback, unregister_callback  # noqa: E402
from vtai.settings import Settings  # noqa: E402
from vtai.turn import TurnRequest, TurnRunner  # noqa: E402

MODEL = "gpt-4o-mini"
# Short on purpose: LiteLLM's mock streams 3 characters per chunk at ~0.7 ms of CPU each, and
# that cost is the same with or without metering.
ANSWER = "Paris, on the Seine, known for the Louvre."
QUESTION = "What is the capital of France, and what is it known for?"


async def _ignore(_token: str) -> None:
    return None


async def bare_turn(user: uuid.UUID, session: str) -> str:
    """The same call and consumption with no metering: what a plain LiteLLM app does."""
    parts = []
    stream = await litellm.acompletion(
        model=MODEL,
        messages=[{"role": "user", "content": f"{QUESTION} ({session})"}],
        stream=True,
        mock_response=ANSWER,
    )
    try:
        async for chunk in stream:
            delta = chunk.choices[0].delta.content if chunk.choices else None
            if delta:
                parts.append(delta)
                await _ignore(delta)
    finally:
        await stream.aclose()
    return "".join(parts)


async def drained() -> None:
    """Wait for LiteLLM's logging worker: its hooks are part of a call's CPU cost."""
    from litellm.litellm_core_utils.logging_worker import GLOBAL_LOGGING_WORKER

    await asyncio.sleep(0)
    await GLOBAL_LOGGING_WORKER.flush()


async def medians(pieces: dict, reps: int) -> dict:
    """Median time of each piece, measured in interleaved rounds so drift hits all alike.

    A piece is (fn, clock, setup): `setup(True/False)` runs untimed around it."""
    times: dict[str, list[float]] = {name: [] for name in pieces}
    for _ in range(reps):
        for name, (fn, clock, setup) in pieces.items():
            setup(True)
            try:
                t0 = clock()
                await fn()
                times[name].append(clock() - t0)
            finally:
                setup(False)
            await asyncio.sleep(0.002)
    return {name: common.median(xs) for name, xs in times.items()}


async def breakdown(services: Services, fast_gate: Gate, user: uuid.UUID, reps: int) -> dict:
    """Medians of the pieces the metered turn adds, one at a time, nothing else running."""
    from vtai.turn import count_prompt

    async def counting() -> None:
        count_prompt(MODEL, [{"role": "user", "content": f"{QUESTION} {uuid.uuid4()}"}])

    def call(**options):
        async def run() -> None:
            stream = await litellm.acompletion(
                model=MODEL,
                messages=[{"role": "user", "content": QUESTION}],
                stream=True,
                mock_response=ANSWER,
                **options,
            )
            async for _chunk in stream:
                pass
            await stream.aclose()
            await drained()

        return run

    def metered_options():
        return call(
            stream_options={"include_usage": True},
            max_tokens=512,
            timeout=120.0,
            litellm_call_id=str(uuid.uuid4()),
            metadata={"vtai": {"user_id": str(user), "tier": "bench"}},
        )()

    def reserve(gate: Gate):
        async def run() -> None:
            await gate.reserve(user, 40, 512)

        return run

    async def ledger_write() -> None:
        await services.ledger.write(settle_row(user, None))

    def unmetered(on: bool) -> None:
        (unregister_callback if on else register_callback)(services.callback)

    def nothing(_on: bool) -> None:
        return None

    cpu = time.process_time
    m = await medians(
        {
            "plain": (call(), cpu, unmetered),
            "usage": (call(stream_options={"include_usage": True}), cpu, unmetered),
            "options": (metered_options, cpu, unmetered),
            "callback": (metered_options, cpu, nothing),
            "count_prompt": (counting, cpu, nothing),
            "gate": (reserve(services.gate), time.perf_counter, nothing),
            "gate_fast": (reserve(fast_gate), time.perf_counter, nothing),
            "ledger_write": (ledger_write, time.perf_counter, nothing),
        },
        reps,
    )
    # The reservations above are never settled: give their quota back.
    await services.db.pool.execute("delete from reservations where end_user = $1", user)
    await services.db.pool.execute(
        "update usage_counters set reserved = 0 where end_user = $1", user
    )
    return {
        "count_prompt": m["count_prompt"],
        "stream_usage": m["usage"] - m["plain"],
        "litellm_options": m["options"] - m["usage"],
        "litellm_callback": m["callback"] - m["options"],
        "gate": m["gate"],
        "gate_fast": m["gate_fast"],
        "ledger_write": m["ledger_write"],
    }


def settle_row(user: uuid.UUID, grant) -> dict:
    return {
        "litellm_call_id": str(uuid.uuid4()),
        "end_user": str(user),
        "status": "success",
        "reservation_id": str(grant.reservation_id) if grant else None,
        "prompt_tokens": 20,
        "completion_tokens": 10,
        "messages": [{"role": "user", "content": QUESTION}],
        "response": ANSWER,
    }


async def phase(users: list[uuid.UUID], turns: int, rate: float, turn) -> tuple[list, float]:
    """Run `turns` turns spread over `users` at `rate` turns/s; latencies and CPU s/turn."""
    think = len(users) / rate
    per_user = max(1, -(-turns // len(users)))
    latencies: list[float] = []

    async def user_loop(user: uuid.UUID, i: int) -> None:
        await asyncio.sleep(random.uniform(0, think))
        for k in range(per_user):
            t0 = time.perf_counter()
            await turn(user, f"chat-{i}-{k}-{uuid.uuid4().hex[:6]}")
            latencies.append(time.perf_counter() - t0)
            await asyncio.sleep(think * random.uniform(0.5, 1.5))

    cpu = time.process_time()
    await asyncio.gather(*(user_loop(u, i) for i, u in enumerate(users)))
    return latencies, (time.process_time() - cpu) / len(latencies)


async def wait_for_rows(conn: asyncpg.Connection, n: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while True:
        count = await conn.fetchval("select count(*) from request_logs")
        if count >= n or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.05)


SIDES = ("bare", "durable", "fast")


async def bench(
    db_url: str, levels: list[int], turns: int, rate: float, rounds: int = 2
) -> common.Section:
    with common.data_dir() as tmp:
        settings = Settings(database_url=db_url, data_dir=tmp, model=MODEL)
        services = await Services.start(settings, replay=False, pool_size=10)
        fast_db = await Database(dataclasses.replace(settings, reserve_commit="fast")).open(
            migrate=False
        )
        conn = await asyncpg.connect(db_url)
        try:
            fast_gate = Gate(fast_db.gate_pool)
            runners = {
                side: TurnRunner(
                    services.gate if side == "durable" else fast_gate,
                    services.ledger,
                    services.callback.notes,
                    settings,
                    call_options={"mock_response": ANSWER},
                )
                for side in SIDES[1:]
            }

            def metered(side: str):
                async def turn(user: uuid.UUID, session: str) -> None:
                    request = TurnRequest(user, session, MODEL, [], f"{QUESTION} ({session})")
                    outcome = await runners[side].run(request, _ignore)
                    assert outcome.kind == "answered" and outcome.reply == ANSWER, outcome

                return turn

            async def unmetered_turn(user: uuid.UUID, session: str) -> None:
                assert await bare_turn(user, session) == ANSWER

            turn_of = {
                "bare": unmetered_turn,
                "durable": metered("durable"),
                "fast": metered("fast"),
            }
            all_users = await common.add_users(conn, max(levels))
            rows, data = [], {"levels": {}}
            data["breakdown"] = await breakdown(
                services, fast_gate, all_users[0], max(20, turns // 10)
            )
            metered_count = await conn.fetchval("select count(*) from request_logs")
            for n in levels:
                users = all_users[:n]
                lat = {side: [] for side in SIDES}
                cpu = {side: [] for side in SIDES}
                # Alternate short blocks so that background load hits every side alike.
                for _ in range(rounds):
                    for side in SIDES:
                        if side == "bare":
                            unregister_callback(services.callback)
                        x, c = await phase(users, turns // rounds, rate, turn_of[side])
                        if side == "bare":
                            register_callback(services.callback)
                        else:
                            metered_count += len(x)
                            # Let the ledger catch up before the next block.
                            await wait_for_rows(conn, metered_count)
                        lat[side] += x
                        cpu[side].append(c)
                d = {"turns": len(lat["durable"])}
                for side in SIDES:
                    d[f"{side}_p50"] = pct(lat[side], 50)
                    d[f"{side}_p99"] = pct(lat[side], 99)
                    d[f"cpu_{side}"] = sum(cpu[side]) / len(cpu[side])
                for side in SIDES[1:]:
                    d[f"added_{side}_p50"] = d[f"{side}_p50"] - d["bare_p50"]
                    d[f"added_{side}_p99"] = d[f"{side}_p99"] - d["bare_p99"]
                data["levels"][n] = d
                rows.append(
                    [
                        n,
                        f"{len(lat['bare']):,}",
                        ms(d["bare_p50"]),
                        ms(d["bare_p99"]),
                        ms(d["added_durable_p50"]),
                        ms(d["added_durable_p99"]),
                        ms(d["added_fast_p50"]),
                        ms(d["added_fast_p99"]),
                        ms(d["cpu_bare"]),
                        ms(d["cpu_durable"]),
                        ms(d["cpu_fast"]),
                    ]
                )
            await asyncio.gather(*(r.drain() for r in runners.values()))
            data["rows"] = await wait_for_rows(conn, metered_count)
            data["metered_turns"] = metered_count
            data["counters_exact"] = await common.counters_exact(conn)
            data["reserved"] = await conn.fetchval(
                "select coalesce(sum(reserved), 0) from usage_counters"
            )
        finally:
            await conn.close()
            await fast_db.close()
            await services.stop()
    return section(levels, turns, rate, rows, data)


def section(levels, turns, rate, rows, data) -> common.Section:
    b = data["breakdown"]
    targets = []
    if 50 in data["levels"]:
        d = data["levels"][50]
        why = (
            f"with one user the pieces below already add up to more: {ms(b['stream_usage'])} ms "
            "for the stream usage the mock makes up, the gate's round trip "
            f"({ms(b['gate'])} ms durable, {ms(b['gate_fast'])} ms fast), "
            f"{ms(b['litellm_callback'])} ms for the callback, {ms(b['count_prompt'])} ms "
            "counting; at 50 users each turn also waits behind the others' work on the one "
            "event loop"
        )
        for side, label in (("durable", "default"), ("fast", "VTAI_RESERVE_COMMIT=fast")):
            p50, p99 = d[f"added_{side}_p50"], d[f"added_{side}_p99"]
            targets += [
                common.Target(f"added p50 at 50 users ({label})", "<= 1 ms", f"{ms(p50)} ms",
                              p50 <= 0.001, why),
                common.Target(f"added p99 at 50 users ({label})", "<= 5 ms", f"{ms(p99)} ms",
                              p99 <= 0.005, why),
            ]  # fmt: skip
    notes = [
        "Metered: `TurnRunner.run` with `mock_response` (token count, gate, LiteLLM call with "
        "usage in the stream, callback, the row held on disk, the batched ledger write); "
        "durable and fast differ only in VTAI_RESERVE_COMMIT. Bare: "
        "`litellm.acompletion(stream=True, mock_response=...)` consumed the same way, with "
        f"VT.ai's callback unregistered. Offered load {rate:g} turns/s in total at every "
        f"level, {turns:,} turns per side per level, in alternating blocks. Every message is "
        "different, so no count is cached.",
        "Added = metered percentile minus bare percentile, in ms. CPU = this process's CPU "
        "time per turn (the database's is not included); one event loop serves all users, so "
        "CPU per turn also sets the throughput ceiling of one app process.",
        f"Ledger rows: {data['rows']:,} of {data['metered_turns']:,} expected; counters "
        f"equal the ledger: {data['counters_exact']}; tokens still reserved: "
        f"{data['reserved']}.",
        "LiteLLM Proxy publishes p50 3 ms / p99 31 ms of added latency for comparison.",
        "Where the metered turn's extra time goes (1 user, nothing else running, medians): "
        f"counting a new message {ms(b['count_prompt'])} ms CPU; usage in the stream "
        f"{ms(b['stream_usage'])} ms CPU (the mock makes it up with LiteLLM's token counter, "
        "where a provider that reports usage sends it in the stream), the other options "
        f"(metadata, call id, timeout, max_tokens) {ms(b['litellm_options'])} ms CPU, and "
        "running VT.ai's callback (LiteLLM's logging payload, then the row) "
        f"{ms(b['litellm_callback'])} ms CPU, all three including "
        "LiteLLM's logging worker; the gate's round trip (`vtai_reserve`) "
        f"{ms(b['gate'])} ms durable, {ms(b['gate_fast'])} ms fast; the ledger write "
        f"({ms(b['ledger_write'])} ms for one row) comes after the answer, batched, on the "
        "same event loop.",
    ]
    columns = [
        "users", "turns per side", "bare p50", "bare p99", "added p50", "added p99",
        "added p50 (fast)", "added p99 (fast)", "CPU/turn bare", "CPU/turn metered",
        "CPU/turn metered (fast)",
    ]  # fmt: skip
    return common.Section(
        "Per-turn overhead",
        "python benchmarks/turn_overhead.py --users "
        + ",".join(map(str, levels))
        + f" --turns {turns} --rate {rate:g}",
        columns,
        rows,
        notes,
        targets,
        data,
    )


async def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--users", default="1,50,200")
    p.add_argument("--turns", type=int, default=2000)
    p.add_argument("--rate", type=float, default=20.0, help="offered turns/s, all users")
    args = p.parse_args()
    levels = [int(s) for s in args.users.split(",")]
    async with common.database(args.db_url) as url:
        result = await bench(url, levels, args.turns, args.rate)
    common.finish(result, args.json)


if __name__ == "__main__":
    asyncio.run(main())
