"""The gate with every plan rule on, against the default plan, at 10^6 history rows.

`vtai_reserve` checks, in one transaction: the model against the tier's patterns, the request
rate, the period's tokens at the model's weight (`model_weights`), the day's tokens (a second
counter row, `daily_counters`) and the period's dollars. "Rules off" is the default plan: a
token limit and nothing else, no weight rules. "All rules on": a tier with a token limit, a
daily cap, a dollar cap, a request rate that never refuses and a few model patterns, and 20
weight rules (exact names and patterns) that the model is looked up in. Same user, same
history, same call (model and prices, as the app passes them); the two alternate in blocks so
drift on a shared machine falls on both.

    python benchmarks/gate_rules.py [--db-url URL] [--rows 1000000] [--turns 2000] [--rounds 4]
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.common import ms, pct  # noqa: E402
from benchmarks.gate_latency import (  # noqa: E402
    MODEL,
    PRICES,
    PROMPT,
    commit_floor,
    preload,
    reserved,
    settle_row,
)
from vtai.db.connection import Database  # noqa: E402
from vtai.metering.gate import Gate  # noqa: E402
from vtai.metering.ledger import Ledger  # noqa: E402
from vtai.metering.spool import Spool  # noqa: E402
from vtai.settings import Settings  # noqa: E402

RULES_TIER = "bench_rules"
DAILY_LIMIT = 10**12
USD_LIMIT = 10**6
RPM = 10**6  # never refuses: the check runs, the minute's count moves
# A few patterns; the model matches only the last, so every one is tried.
MODELS = ["anthropic/claude-*", "gemini/*", "openai/gpt-4.1*", "gpt-4o*"]
# 20 rules, exact names and patterns; the model matches two patterns, the longer wins (0.5).
WEIGHTS = [
    ("gpt-4o", 2), ("gpt-4.1", 2), ("gpt-4.1-mini", 0.4), ("o1", 6), ("o3", 4),
    ("o3-mini", 1.1), ("claude-3-5-sonnet-20241022", 3), ("claude-3-5-haiku-20241022", 0.8),
    ("gemini/gemini-1.5-pro", 1.25), ("local/smollm2-135m", 0),
    ("gpt-4o-mini*", 0.5), ("gpt-4o*", 2), ("o1-*", 6), ("anthropic/*", 3),
    ("anthropic/claude-3-haiku*", 0.25), ("gemini/*flash*", 0.1), ("gemini/*", 1.25),
    ("openrouter/*", 1.5), ("ollama/*", 0), ("*-preview", 2.5),
]  # fmt: skip
BLOCK_WARMUP = 10  # turns after each switch: replanned statements, cold pool connections
CONFIGS = [("off", "durable"), ("on", "durable"), ("off", "fast"), ("on", "fast")]


async def add_rules_tier(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "insert into tiers (name, token_limit, rank, daily_limit, usd_limit, rpm, models)"
        " values ($1, $2, 9, $3, $4, $5, $6) on conflict (name) do update set"
        " token_limit = excluded.token_limit, daily_limit = excluded.daily_limit,"
        " usd_limit = excluded.usd_limit, rpm = excluded.rpm, models = excluded.models",
        RULES_TIER,
        common.BENCH_LIMIT,
        DAILY_LIMIT,
        USD_LIMIT,
        RPM,
        MODELS,
    )


async def set_rules(conn: asyncpg.Connection, user: uuid.UUID, on: bool) -> None:
    """The user's plan and the weight rules, all on or all off (between blocks, not timed)."""
    async with conn.transaction():
        tier = RULES_TIER if on else common.BENCH_TIER
        await conn.execute("update profiles set tier = $2 where id = $1", user, tier)
        await conn.execute("delete from model_weights")
        if on:
            await conn.executemany(
                "insert into model_weights (pattern, weight) values ($1, $2)", WEIGHTS
            )
    # No dead rows left for the weight lookup to step over.
    await conn.execute("vacuum analyze model_weights, profiles")


async def block(gate: Gate, ledger: Ledger, user: uuid.UUID, turns: int, warmup: int):
    reserve, settle, grant = [], [], None
    for i in range(warmup + turns):
        t0 = time.perf_counter()
        grant = await gate.reserve(user, PROMPT, 512, model=MODEL, prices=PRICES)
        t1 = time.perf_counter()
        assert grant.granted and grant.max_tokens == 512, grant
        assert await ledger.write(settle_row(user, grant))
        t2 = time.perf_counter()
        if i >= warmup:
            reserve.append(t1 - t0)
            settle.append(t2 - t1)
    return reserve, settle, grant


# The function alone: each call timed inside the server (no network, no client, no commit
# wait), then its reservation released and committed, as a turn would leave it.
SERVER_LOOP = """
do $$
declare
  t0 timestamptz;
  r record;
  took float8[] := '{}';
begin
  for i in 1..%(n)d loop
    t0 := clock_timestamp();
    select * into r from vtai_reserve('%(user)s', %(prompt)d, 512, 'month', 900, now(),
                                      '%(model)s', %(price_in)s, %(price_out)s, false);
    took := took || extract(epoch from clock_timestamp() - t0);
    if not r.granted then
      raise exception 'refused: %%', r.reason;
    end if;
    perform vtai_release(r.reservation_id, '%(user)s');
    commit;
  end loop;
  raise notice 'took %%', array_to_json(took);
end
$$
"""


async def in_server(conn: asyncpg.Connection, user: uuid.UUID, n: int, warmup: int) -> list[float]:
    notes: list[str] = []

    def listen(_conn, message) -> None:
        notes.append(message.message)

    conn.add_log_listener(listen)
    try:
        await conn.execute("set synchronous_commit = off")  # the commits are not measured
        args = {"user": user, "prompt": PROMPT, "model": MODEL, "n": warmup + n}
        args.update(price_in=repr(PRICES[0]), price_out=repr(PRICES[1]))
        await conn.execute(SERVER_LOOP % args)
    finally:
        await conn.execute("reset synchronous_commit")
        conn.remove_log_listener(listen)
    (took,) = [m for m in notes if m.startswith("took ")]
    return json.loads(took.removeprefix("took "))[warmup:]


def facts(grant) -> dict:
    """What the last grant said about the plan: proof of which rules ran."""
    keys = ["tier", "weight", "token_limit", "daily_limit", "usd_limit", "rpm"]
    return {k: getattr(grant, k) for k in keys}


async def bench(
    db_url: str, rows: int, turns: int, rounds: int = 4, warmup: int = 50
) -> common.Section:
    per_block = max(1, turns // rounds)
    times = {c: ([], []) for c in CONFIGS}
    data: dict = {"rows": rows, "configs": {}, "grants": {}, "server": {}}
    with common.data_dir() as tmp:
        durable = Settings(database_url=db_url, data_dir=Path(tmp), model=MODEL)
        fast = durable.model_copy(update={"reserve_commit": "fast"})
        db = await Database(durable).open(migrate=False)
        fast_db = await Database(fast).open(migrate=False)
        try:
            gates = {"durable": Gate(db.gate_pool), "fast": Gate(fast_db.gate_pool)}
            ledger = Ledger(db.pool, Spool(durable.spool_dir))
            conn = await asyncpg.connect(db_url)
            try:
                await add_rules_tier(conn)
                (user,) = await common.add_users(conn, 1)
                await set_rules(conn, user, True)  # history at the rules' weight
                await preload(conn, user, rows)
                data["daily_rows"] = await conn.fetchval(
                    "select count(*) from daily_counters where end_user = $1", user
                )
                for r in range(rounds):
                    for rules, commit in CONFIGS:
                        await set_rules(conn, user, rules == "on")
                        first = warmup if r == 0 else BLOCK_WARMUP
                        res, st, grant = await block(gates[commit], ledger, user, per_block, first)
                        times[rules, commit][0].extend(res)
                        times[rules, commit][1].extend(st)
                        data["grants"][rules] = facts(grant)
                server = {"off": [], "on": []}
                for _ in range(2):
                    for rules in server:
                        await set_rules(conn, user, rules == "on")
                        server[rules] += await in_server(conn, user, turns // 2, BLOCK_WARMUP)
                for rules, values in server.items():
                    data["server"][rules] = {
                        "calls": len(values),
                        **{f"p{p}": pct(values, p) for p in (50, 95, 99)},
                    }
                floor = await commit_floor(conn, turns)
                data["floor_p50"], data["floor_p99"] = pct(floor, 50), pct(floor, 99)
                data["ledger_rows"] = await conn.fetchval("select count(*) from request_logs")
                data["reserved"] = await reserved(conn, user)
                data["cost_reserved"] = float(
                    await conn.fetchval(
                        "select sum(cost_reserved) from usage_counters where end_user = $1", user
                    )
                )
                data["reservations"] = await conn.fetchval("select count(*) from reservations")
                data["counters_exact"] = await common.counters_exact(conn)
            finally:
                await conn.close()
        finally:
            await fast_db.close()
            await db.close()
    table = []
    for rules, commit in CONFIGS:
        res, st = times[rules, commit]
        both = [a + b for a, b in zip(res, st, strict=True)]
        d = {"turns": len(res)}
        for name, values in (("reserve", res), ("settle", st), ("turn", both)):
            for p in (50, 95, 99):
                d[f"{name}_p{p}"] = pct(values, p)
        data["configs"][f"{rules}/{commit}"] = d
        table.append(
            [
                "all on" if rules == "on" else "off (default plan)",
                commit,
                f"{rows:,}",
                len(res),
                *(ms(d[f"{n}_p{p}"]) for n in ("reserve", "settle", "turn") for p in (50, 95, 99)),
            ]
        )
    return section(rows, turns, rounds, table, data)


def section(rows, turns, rounds, table, data) -> common.Section:
    on, off = data["configs"]["on/durable"], data["configs"]["off/durable"]
    on_fast, off_fast = data["configs"]["on/fast"], data["configs"]["off/fast"]
    srv = data["server"]["on"]

    def why(commit: str) -> str:
        return (
            f"`vtai_reserve` alone takes p50 {ms(srv['p50'])} / p99 {ms(srv['p99'])} ms in the "
            f"server with every rule on (notes){commit}; the rest is the round trip through "
            "asyncpg and loopback and the scheduling of 2 cores shared with Postgres and more"
        )

    floor = f", a durable commit p99 {ms(data['floor_p99'])} ms more"
    targets = [
        common.Target(
            f"reserve p99 at {rows:,} rows, all rules on, VTAI_RESERVE_COMMIT=durable (default)",
            "<= 1 ms",
            f"{ms(on['reserve_p99'])} ms",
            on["reserve_p99"] <= 0.001,
            why(floor),
        ),
        common.Target(
            f"reserve p99 at {rows:,} rows, all rules on, VTAI_RESERVE_COMMIT=fast",
            "<= 1 ms",
            f"{ms(on_fast['reserve_p99'])} ms",
            on_fast["reserve_p99"] <= 0.001,
            why(""),
        ),
    ]
    g = data["grants"]["on"]
    srv_on, srv_off = data["server"]["on"], data["server"]["off"]
    notes = [
        "One user; "
        f"{rows:,} history rows COPYed into `request_logs` for the current month as the "
        "settle writes them (cost, weight, counted tokens, UTC day), triggers off, then "
        "`vtai_backfill_aggregates`; the period counter (tokens, raw tokens, dollars) and one "
        f"`daily_counters` row per day of history ({data['daily_rows']}) rebuilt from the "
        "ledger, then VACUUM ANALYZE and CHECKPOINT (loading not timed).",
        "Turn: `Gate.reserve(..., model=, prices=)` (`vtai_reserve`) then `Ledger.write` (a "
        "one-row `vtai_record_batch` settling the reservation, its period and day counters), "
        f"sequential, through the app's asyncpg pools on loopback TCP. {rounds} rounds; each "
        f"runs every row of the table for {turns // rounds:,} turns after "
        f"{BLOCK_WARMUP} warm-up turns (50 in the first round), so rules off and on alternate.",
        f"Rules off: tier `{common.BENCH_TIER}` (token limit only: no daily, dollar or rate "
        "cap, models `{*}`), `model_weights` empty. All rules on: tier "
        f"`{RULES_TIER}` with token limit {g['token_limit']:,}, daily cap "
        f"{g['daily_limit']:,}, dollar cap {g['usd_limit']:,.0f} USD, {g['rpm']:,} "
        f"requests/min, models `{{{','.join(MODELS)}}}` (the model matches the last), and "
        f"{len(WEIGHTS)} weight rules, 10 of them patterns; `{MODEL}` counts "
        f"{g['weight']} (a pattern). Every turn asks {PROMPT} + 512 tokens at "
        f"{PRICES[0]:g}/{PRICES[1]:g} USD per token and is granted all of it.",
        "Columns are milliseconds. Turn = reserve + settle. Added by the rules, p50: reserve "
        f"{ms(on['reserve_p50'] - off['reserve_p50'])} (durable) / "
        f"{ms(on_fast['reserve_p50'] - off_fast['reserve_p50'])} (fast), settle "
        f"{ms(on['settle_p50'] - off['settle_p50'])}.",
        "Inside the server (`vtai_reserve` alone, timed with `clock_timestamp()` in a DO "
        f"loop, no network, no client, no commit wait; {srv_on['calls']:,} calls each, each "
        "released and committed): rules off p50 "
        f"{ms(srv_off['p50'])} / p95 {ms(srv_off['p95'])} / p99 {ms(srv_off['p99'])}, all rules "
        f"on p50 {ms(srv_on['p50'])} / p95 {ms(srv_on['p95'])} / p99 {ms(srv_on['p99'])}.",
        "Commit floor (one-row durable inserts into a scratch table, right after): p50 "
        f"{ms(data['floor_p50'])}, p99 {ms(data['floor_p99'])}.",
        f"After the run: counters equal the ledger (period and day): {data['counters_exact']}; "
        f"tokens still reserved: {data['reserved']}; dollars still reserved: "
        f"{data['cost_reserved']}; reservations left: {data['reservations']}.",
    ]
    columns = [
        "rules", "commit", "history rows", "turns", "reserve p50", "reserve p95",
        "reserve p99", "settle p50", "settle p95", "settle p99", "turn p50", "turn p95",
        "turn p99",
    ]  # fmt: skip
    return common.Section(
        "Gate with every plan rule on",
        f"python benchmarks/gate_rules.py --rows {rows} --turns {turns} --rounds {rounds}",
        columns,
        table,
        notes,
        targets,
        data,
    )


async def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--turns", type=int, default=2000, help="measured turns per table row")
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    async with common.database(args.db_url) as url:
        result = await bench(url, args.rows, args.turns, args.rounds)
    common.finish(result, args.json)


if __name__ == "__main__":
    asyncio.run(main())
