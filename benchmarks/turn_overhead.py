"""What metering adds to a chat turn: the full TurnRunner path against a bare LiteLLM stream.

Both sides use LiteLLM's `mock_response` (a model that answers instantly), so the difference
is VT.ai's work: counting the prompt, the gate, the call's metadata, and the callback's row
building and ledger write, which run on the same event loop.

A level is N users at a total offered rate R turns/s (`N@R`): each user sends a message,
reads the answer, thinks for about N/R seconds and sends the next. 50@5 is people chatting
(a message every ~10 s each); 50@25 is a stress pace (every ~2 s). Two latencies per turn,
from sending the message: to its last token reaching the user (`on_token`), and to `run()`
returning (when the app adds the quota line and closes the message).

Metered sides: "ahead" is the default (VTAI_RESERVE_AHEAD=on: each user's chat reserves its
next turn after an answer, so the gate's round trip runs while they think); "in line" reserves
when the message arrives (VTAI_RESERVE_AHEAD=off).

    python benchmarks/turn_overhead.py [--db-url URL] [--levels 1@25,50@5,200@20,50@25]
        [--turns 500]
"""

from __future__ import annotations

import argparse
import asyncio
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
from vtai.db.connection import Database  # noqa: E402
from vtai.llm import stream_end as litellm_stream_end  # noqa: E402
from vtai.llm import tokens  # noqa: E402
from vtai.metering.ahead import NextTurn  # noqa: E402
from vtai.metering.gate import Gate  # noqa: E402
from vtai.metering.turn import TurnRequest, TurnRunner  # noqa: E402
from vtai.services import Services, register_callback, unregister_callback  # noqa: E402
from vtai.settings import Settings  # noqa: E402

MODEL = "gpt-4o-mini"
# Short on purpose: LiteLLM's mock streams 3 characters per chunk at ~0.7 ms of CPU each, and
# that cost is the same with or without metering.
ANSWER = "Paris, on the Seine, known for the Louvre."
# For the breakdown only: about 330 chunks, the length of a typical chat answer in tokens.
LONG_ANSWER = " ".join(["word"] * 200)
QUESTION = "What is the capital of France, and what is it known for?"


async def _ignore(_token: str) -> None:
    return None


class LastToken:
    """An `on_token` that notes when the latest token reached the user."""

    def __init__(self) -> None:
        self.at = 0.0

    async def __call__(self, _token: str) -> None:
        self.at = time.perf_counter()


async def bare_turn(user: uuid.UUID, session: str, on_token=_ignore) -> str:
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
                await on_token(delta)
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
    from vtai.metering.turn import count_prompt

    async def counting() -> None:
        count_prompt(MODEL, [{"role": "user", "content": f"{QUESTION} {uuid.uuid4()}"}])

    usage = {"stream_options": {"include_usage": True}}

    def call(answer=ANSWER, **options):
        async def run() -> None:
            stream = await litellm.acompletion(
                model=MODEL,
                messages=[{"role": "user", "content": QUESTION}],
                stream=True,
                mock_response=answer,
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

    prices = tokens.prices(MODEL)  # as the app passes them, looked up once

    def reserve(gate: Gate):
        async def run() -> None:
            await gate.reserve(user, 40, 512, model=MODEL, prices=prices)

        return run

    async def ledger_write() -> None:
        await services.ledger.write(settle_row(user, None))

    def unmetered(on: bool) -> None:
        (unregister_callback if on else register_callback)(services.callback)

    def as_litellm(on: bool) -> None:
        """Unmetered, and LiteLLM's end of stream as it ships (vtai.llm.stream_end)."""
        unmetered(on)
        (litellm_stream_end.remove if on else litellm_stream_end.apply)()

    def nothing(_on: bool) -> None:
        return None

    cpu = time.process_time
    m = await medians(
        {
            "plain": (call(), cpu, unmetered),
            "usage": (call(**usage), cpu, unmetered),
            "plain_as_shipped": (call(), cpu, as_litellm),
            "usage_as_shipped": (call(**usage), cpu, as_litellm),
            "plain_long": (call(LONG_ANSWER), cpu, unmetered),
            "usage_long": (call(LONG_ANSWER, **usage), cpu, unmetered),
            "plain_long_as_shipped": (call(LONG_ANSWER), cpu, as_litellm),
            "usage_long_as_shipped": (call(LONG_ANSWER, **usage), cpu, as_litellm),
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
        "update usage_counters set reserved = 0, cost_reserved = 0 where end_user = $1", user
    )
    await services.db.pool.execute(
        "update daily_counters set reserved = 0 where end_user = $1", user
    )
    return {
        "count_prompt": m["count_prompt"],
        "stream_usage": m["usage"] - m["plain"],
        "stream_usage_as_shipped": m["usage_as_shipped"] - m["plain_as_shipped"],
        "stream_usage_long": m["usage_long"] - m["plain_long"],
        "stream_usage_long_as_shipped": m["usage_long_as_shipped"] - m["plain_long_as_shipped"],
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


async def phase(users: list[uuid.UUID], turns: int, rate: float, turn) -> tuple[list, list, float]:
    """Run `turns` turns spread over `users` at `rate` turns/s. `turn(user, session, on_token)`;
    returns latencies to the last token, latencies to the return, and CPU s/turn."""
    think = len(users) / rate
    per_user = max(1, -(-turns // len(users)))
    to_last, to_return = [], []

    async def user_loop(user: uuid.UUID, i: int) -> None:
        await asyncio.sleep(random.uniform(0, think))
        for k in range(per_user):
            last = LastToken()
            t0 = time.perf_counter()
            await turn(user, f"chat-{i}-{k}-{uuid.uuid4().hex[:6]}", last)
            to_return.append(time.perf_counter() - t0)
            to_last.append(last.at - t0)
            await asyncio.sleep(think * random.uniform(0.5, 1.5))

    cpu = time.process_time()
    await asyncio.gather(*(user_loop(u, i) for i, u in enumerate(users)))
    return to_last, to_return, (time.process_time() - cpu) / len(to_return)


async def wait_for_rows(conn: asyncpg.Connection, n: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while True:
        count = await conn.fetchval("select count(*) from request_logs")
        if count >= n or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.05)


SIDES = ("bare", "inline", "ahead")
METERED = SIDES[1:]


async def bench(
    db_url: str, levels: list[tuple[int, float]], turns: int, rounds: int = 8
) -> common.Section:
    with common.data_dir() as tmp:
        settings = Settings(database_url=db_url, data_dir=tmp, model=MODEL)
        services = await Services.start(settings, replay=False, pool_size=10)
        fast_db = await Database(settings.model_copy(update={"reserve_commit": "fast"})).open(
            migrate=False
        )
        conn = await asyncpg.connect(db_url)
        holders: dict[uuid.UUID, NextTurn] = {}
        try:
            fast_gate = Gate(fast_db.gate_pool)
            runner = TurnRunner(
                services.gate,
                services.ledger,
                services.callback.notes,
                settings,
                call_options={"mock_response": ANSWER},
            )

            def metered(side: str):
                async def turn(user: uuid.UUID, session: str, on_token) -> None:
                    holder = holders[user] if side == "ahead" else None
                    request = TurnRequest(
                        user, session, MODEL, [], f"{QUESTION} ({session})", holder
                    )
                    outcome = await runner.run(request, on_token)
                    assert outcome.kind == "answered" and outcome.reply == ANSWER, outcome

                return turn

            async def unmetered_turn(user: uuid.UUID, session: str, on_token) -> None:
                assert await bare_turn(user, session, on_token) == ANSWER

            turn_of = {"bare": unmetered_turn, **{side: metered(side) for side in METERED}}
            all_users = await common.add_users(conn, max(n for n, _ in levels))
            for user in all_users:
                # Each user has one chat open; opening it reserves its first turn.
                holders[user] = runner.next_turn()
                runner.reserve_ahead(holders[user], user, MODEL, [])
            rows, data = [], {"levels": {}, "rounds": rounds}
            data["breakdown"] = await breakdown(
                services, fast_gate, all_users[0], max(20, turns // 10)
            )
            metered_count = await conn.fetchval("select count(*) from request_logs")
            for n, rate in levels:
                users = all_users[:n]
                last = {side: [] for side in SIDES}
                done = {side: [] for side in SIDES}
                cpu = {side: [] for side in SIDES}
                blocks = {side: [] for side in SIDES}  # each block's last-token p50
                # Alternate short blocks so that background load hits every side alike.
                for _ in range(rounds):
                    for side in SIDES:
                        if side == "bare":
                            unregister_callback(services.callback)
                        x, y, c = await phase(users, turns // rounds, rate, turn_of[side])
                        if side == "bare":
                            register_callback(services.callback)
                        else:
                            metered_count += len(x)
                            # Let the ledger catch up before the next block.
                            await wait_for_rows(conn, metered_count)
                        last[side] += x
                        done[side] += y
                        cpu[side].append(c)
                        blocks[side].append(pct(x, 50))
                d = {"turns": len(done["ahead"]), **block_spread(blocks)}
                for side in SIDES:
                    for what, values in (("last", last[side]), ("done", done[side])):
                        d[f"{side}_{what}_p50"] = pct(values, 50)
                        d[f"{side}_{what}_p99"] = pct(values, 99)
                    d[f"cpu_{side}"] = sum(cpu[side]) / len(cpu[side])
                for side in METERED:
                    for what in ("last", "done"):
                        for p in ("p50", "p99"):
                            d[f"added_{side}_{what}_{p}"] = (
                                d[f"{side}_{what}_{p}"] - d[f"bare_{what}_{p}"]
                            )
                data["levels"][label(n, rate)] = d
                added = [
                    ms(d[f"added_{side}_{what}_{p}"])
                    for side in ("ahead", "inline")
                    for what in ("last", "done")
                    for p in ("p50", "p99")
                ]
                rows.append(
                    [n, f"{rate:g}", f"{len(done['bare']):,}"]
                    + [ms(d["bare_last_p50"]), ms(d["bare_done_p50"]), *added]
                    + [ms(d[f"cpu_{side}"]) for side in ("bare", "ahead", "inline")]
                )
            await runner.release_ahead()
            await runner.drain()
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
    return section(levels, turns, rows, data)


def block_spread(blocks: dict[str, list[float]]) -> dict:
    """How much one block differs from the next: the noise a pooled percentile carries.

    The bare side runs the same code at the same load in every block, so the range of its
    block p50s is this machine's noise; each round's metered (ahead) block minus the same
    round's bare block is the added latency with drift between rounds taken out."""
    paired = [a - b for a, b in zip(blocks["ahead"], blocks["bare"], strict=True)]
    return {
        "bare_block_p50_min": min(blocks["bare"]),
        "bare_block_p50_max": max(blocks["bare"]),
        "paired_added_last_p50": common.median(paired),
        "paired_added_last_p50_min": min(paired),
        "paired_added_last_p50_max": max(paired),
    }


def noise(d: dict) -> str:
    return (
        f"the bare side's own last-token p50 ranged {ms(d['bare_block_p50_min'])}-"
        f"{ms(d['bare_block_p50_max'])} ms from one block to the next; per round, metered "
        f"minus bare had median {ms(d['paired_added_last_p50'])} ms (from "
        f"{ms(d['paired_added_last_p50_min'])} to {ms(d['paired_added_last_p50_max'])})"
    )


def label(users: int, rate: float) -> str:
    return f"{users}@{rate:g}"


def section(levels, turns, rows, data) -> common.Section:
    b = data["breakdown"]
    targets = []
    for key, pace in (("50@5", "chatting, a message every ~10 s"), ("50@25", "stress, every ~2 s")):
        d = data["levels"].get(key)
        if d is None:
            continue
        why = (
            "nothing of the gate is on the reply's path, and after the usage chunk the turn "
            "only holds its row on disk and returns; what is left is waiting behind other "
            "users' work on the one event loop, where a metered turn costs "
            f"{ms(d['cpu_ahead'] - d['cpu_bare'])} ms more CPU (usage in the stream, "
            "LiteLLM's success hooks, VT.ai's row, the ledger write, the next turn's "
            "reservation), so at this pace a turn more often waits behind one; and in this "
            f"run {noise(d)}"
        )
        for what, label_ in (("last", "to the last token"), ("done", "to `run()` returning")):
            p50, p99 = d[f"added_ahead_{what}_p50"], d[f"added_ahead_{what}_p99"]
            targets += [
                common.Target(f"added p50, 50 users {pace}, {label_}", "<= 1 ms",
                              f"{ms(p50)} ms", p50 <= 0.001, why),
                common.Target(f"added p99, 50 users {pace}, {label_}", "<= 5 ms",
                              f"{ms(p99)} ms", p99 <= 0.005, why),
            ]  # fmt: skip
    notes = [
        "Metered: `TurnRunner.run` with `mock_response` (token count, the reservation, "
        "LiteLLM call with usage in the stream, callback, the row held on disk, the batched "
        "ledger write). Ahead (the default): each user's chat reserved its next turn right "
        "after the previous answer (and when it opened), so the turn spends that reservation; "
        "in line (VTAI_RESERVE_AHEAD=off): the turn calls `vtai_reserve` when the message "
        "arrives. Bare: `litellm.acompletion(stream=True, mock_response=...)` consumed the "
        "same way, with VT.ai's callback unregistered: the same process with metering off, "
        "so both sides run `vtai.llm.stream_end` (the breakdown below shows LiteLLM as it "
        "ships). Offered load "
        "N@R: N users offering R turns/s in total; "
        f"at least {turns:,} turns per side per level (whole turns per user: the table gives "
        f"the count), in {data['rounds']} alternating blocks per side. Every message is "
        "different, so no count is cached.",
        "Added = metered percentile minus bare percentile, in ms. Last token: from sending the "
        "message to its answer's last token handed to the UI (the answer is complete on the "
        "user's screen). Return: to `run()` returning, when the app appends the quota line. "
        "CPU = this process's CPU time per turn (the database's is not included); one event "
        "loop serves all users, so CPU per turn also sets the throughput ceiling of one app "
        "process.",
        f"Ledger rows: {data['rows']:,} of {data['metered_turns']:,} expected; counters "
        f"equal the ledger: {data['counters_exact']}; tokens still reserved after the chats "
        f"closed: {data['reserved']}.",
        "Noise, last token, ahead: "
        + "; ".join(f"{key}: {noise(d)}" for key, d in data["levels"].items())
        + ". A pooled p50 can move by that much between runs of the same code.",
        "LiteLLM Proxy publishes p50 3 ms / p99 31 ms of added latency for comparison.",
        "Where the metered turn's extra time goes (1 user, nothing else running, medians): "
        f"counting a new message {ms(b['count_prompt'])} ms CPU; usage in the stream "
        f"{ms(b['stream_usage'])} ms CPU ({ms(b['stream_usage_as_shipped'])} ms with "
        "LiteLLM as it ships, which builds the finished response once for the usage chunk "
        "and again at the end of the stream; on a 330-chunk answer "
        f"{ms(b['stream_usage_long'])} ms, against {ms(b['stream_usage_long_as_shipped'])} "
        "ms as it ships), the other options "
        f"(metadata, call id, timeout, max_tokens) {ms(b['litellm_options'])} ms CPU, and "
        "running VT.ai's callback (LiteLLM's logging payload, then the row) "
        f"{ms(b['litellm_callback'])} ms CPU, all three including "
        "LiteLLM's logging worker; the gate's round trip (`vtai_reserve`) "
        f"{ms(b['gate'])} ms durable, {ms(b['gate_fast'])} ms fast, before the answer only "
        f"in line; the ledger write ({ms(b['ledger_write'])} ms for one row) comes after "
        "the answer, batched, on the same event loop.",
    ]
    columns = [
        "users", "turns/s", "turns per side", "bare: last token p50", "bare: return p50",
        "added p50 (last token)", "added p99 (last token)", "added p50 (return)",
        "added p99 (return)", "in line: added p50 (last token)",
        "in line: added p99 (last token)", "in line: added p50 (return)",
        "in line: added p99 (return)", "CPU/turn bare", "CPU/turn metered",
        "CPU/turn in line",
    ]  # fmt: skip
    return common.Section(
        "Per-turn overhead",
        "python benchmarks/turn_overhead.py --levels "
        + ",".join(label(n, r) for n, r in levels)
        + f" --turns {turns}",
        columns,
        rows,
        notes,
        targets,
        data,
    )


def parse_levels(text: str) -> list[tuple[int, float]]:
    """'1@25,50@5' -> [(1, 25.0), (50, 5.0)]; anything else is argparse's one-line error."""
    levels = []
    for part in text.split(","):
        users, _, rate = part.strip().partition("@")
        try:
            level = (int(users), float(rate))
        except ValueError:
            level = (0, 0.0)
        if level[0] < 1 or level[1] <= 0:
            raise argparse.ArgumentTypeError(
                f"{part.strip()!r} is not USERS@TURNS_PER_SECOND, e.g. 50@5"
            )
        levels.append(level)
    return levels


async def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--levels",
        type=parse_levels,
        default="1@25,50@5,200@20,50@25",
        help="users@turns/s, comma-separated",
    )
    p.add_argument("--turns", type=int, default=500, help="per side per level")
    args = p.parse_args()
    levels = args.levels
    async with common.database(args.db_url) as url:
        result = await bench(url, levels, args.turns)
    common.finish(result, args.json)


if __name__ == "__main__":
    asyncio.run(main())
