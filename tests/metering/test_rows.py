"""vtai.metering.rows: one builder for every ledger row, and the life of a call's
OpenCalls entry."""

from __future__ import annotations

import asyncio
import json
import uuid

import litellm
import pytest

from tests.conftest import add_user
from tests.metering.test_turn import collect, request, runner_for, wait_for_rows
from vtai.llm import tokens
from vtai.metering import rows
from vtai.metering.rows import Facts, OpenCalls, Tokens
from vtai.metering.turn import TurnRunner

MODEL = "gpt-4o-mini"


def facts(model: str = MODEL, **extra) -> Facts:
    return Facts(
        str(uuid.uuid4()), str(uuid.uuid4()), "chat", model, "openai", "free", 100, **extra
    )


def test_cost_counts_cached_and_reasoning_tokens_at_their_own_rates():
    usage = litellm.Usage(
        prompt_tokens=1200,
        completion_tokens=300,
        total_tokens=1500,
        prompt_tokens_details={"cached_tokens": 1024},
        completion_tokens_details={"reasoning_tokens": 200},
    )
    counted = Tokens.from_usage(usage)
    assert counted == Tokens(1200, 300, 1024, 200)
    for model in (MODEL, "o3-mini", "gemini/gemini-2.5-flash"):
        litellms = sum(litellm.cost_per_token(model=model, usage_object=usage))
        assert counted.cost(model) == pytest.approx(litellms, rel=1e-9), model
    # The discount is real: the same tokens uncached cost more.
    assert Tokens(1200, 300).cost(MODEL) > counted.cost(MODEL)


def test_usage_as_a_dict_and_without_usage():
    assert Tokens.from_usage({"prompt_tokens": 5, "completion_tokens": 2}) == Tokens(5, 2)
    assert Tokens.from_usage(None) is None
    assert Tokens.from_usage({"total_tokens": 7}) is None


def test_a_model_without_a_price_is_unknown_never_zero():
    assert tokens.cost("openai/no-such-model", 10, 10) is None
    row = rows.build(facts("openai/no-such-model"), "success", "full", usage=Tokens(10, 10))
    assert row["total_cost"] is None and row["additional_details"]["cost_unknown"] is True
    # Nothing charged costs nothing, price or not.
    refused = rows.build(facts("openai/no-such-model"), "refused", "full")
    assert refused["total_cost"] == 0.0 and "cost_unknown" not in refused["additional_details"]
    assert tokens.cost("local/smollm2-135m", 1000, 1000) == 0.0


def test_every_status_has_the_same_fields_from_the_same_facts():
    f = facts(trimmed=2)
    built = [
        rows.build(f, "refused", "full", details={"reason": "quota_exhausted"}),
        rows.build(f, "failure", "full", usage=Tokens(10, 0, estimated=True), error={"x": 1}),
        rows.build(f, "success", "full", usage=Tokens(10, 5, 4), response="hi"),
    ]
    assert len({tuple(r) for r in built}) == 1
    for r in built:
        assert (r["litellm_call_id"], r["created_at"], r["provider"]) == (
            f.call_id,
            f.created_at,
            "openai",
        )
        assert r["additional_details"]["trimmed_messages"] == 2
    assert built[2]["additional_details"]["cached_tokens"] == 4
    assert built[2]["total_cost"] == pytest.approx(tokens.cost(MODEL, 10, 5, 4))


def test_facts_travel_through_metadata_and_back():
    f = facts(reservation_id=str(uuid.uuid4()))
    assert Facts.from_meta(json.loads(json.dumps(f.meta()))) == f
    assert Facts.from_meta({"user_id": "x"}) is None and Facts.from_meta(None) is None


async def test_open_calls_life_cycle():
    calls = OpenCalls()
    f = facts()
    call = calls.open(f)
    assert f.call_id in calls and len(calls) == 1
    assert calls.take(f.call_id) is call
    # Taken once: whoever comes second writes nothing.
    assert calls.take(f.call_id) is None and len(calls) == 0

    async def write():
        return True

    assert await call.record(write) is True and await call.settled is True


# --- Through a real turn and the real callback, into Postgres --------------------------------


async def test_answered_call_entry_is_taken_by_the_success_hook(services, conn):
    user = await add_user(conn)
    runner = runner_for(services, mock_response="A full answer here.")
    outcome, _ = await collect(runner, request(user))
    assert outcome.call_id in services.callback.notes  # open until the hook writes its row
    assert await asyncio.wait_for(outcome.settled, 10) is True
    assert len(services.callback.notes) == 0
    r = await conn.fetchrow("select additional_details, total_cost from request_logs")
    assert '"provisional"' not in r["additional_details"] and r["total_cost"] > 0
    assert services.ledger.spool.in_flight == 0  # the provisional copy is gone too


async def test_failed_call_entry_is_taken_by_the_turn_and_written_once(services, conn):
    user = await add_user(conn)
    writes: list[str] = []
    store = services.ledger.store
    send = store.record_encoded

    async def counting(texts):
        writes.extend(json.loads(t)["litellm_call_id"] for t in texts)
        return await send(texts)

    store.record_encoded = counting
    runner = runner_for(services, mock_response=Exception("upstream exploded"))
    outcome, _ = await collect(runner, request(user))
    assert outcome.kind == "failed" and outcome.call_id not in services.callback.notes
    await outcome.settled
    await services.flush()  # LiteLLM's failure hooks have run
    assert writes == [outcome.call_id]
    assert await wait_for_rows(conn, 1) == 1


async def test_without_the_hook_the_row_held_at_the_answer_is_recorded(services, conn, monkeypatch):
    """A runner whose calls the callback never sees: its entries must not live on."""
    monkeypatch.setattr("vtai.metering.turn.HOOK_WAIT", 0.5)
    user = await add_user(conn)
    runner = TurnRunner(
        services.gate,
        services.ledger,
        OpenCalls(),  # not the callback's
        services.runner.settings.model_copy(update={"model": MODEL}),
        call_options={"mock_response": "answered"},
    )
    outcome, _ = await collect(runner, request(user))
    await runner.drain()
    assert len(runner.calls) == 0 and await outcome.settled is True
    r = await conn.fetchrow("select status, total_tokens, additional_details from request_logs")
    assert r["status"] == "success" and r["total_tokens"] > 0
    assert json.loads(r["additional_details"])["provisional"] is True
    assert await conn.fetch("select * from vtai_verify_counters()") == []


async def test_admin_log_and_csv_show_an_unknown_cost_as_unknown(services, conn):
    from vtai.admin import export, reports

    user = await add_user(conn)
    unpriced = Facts(str(uuid.uuid4()), str(user.id), "chat", "openai/no-such-model", "openai")
    priced = Facts(str(uuid.uuid4()), str(user.id), "chat", MODEL, "openai")
    for f in (unpriced, priced):
        assert await services.ledger.write(rows.build(f, "success", "full", usage=Tokens(9, 3)))
    page = await reports.log_page(services.db.pool, reports.LogFilter(user=user.id))
    costs = {r["model"]: r["total_cost"] for r in page["rows"]}
    assert costs["openai/no-such-model"] is None and costs[MODEL] > 0
    csv = "".join([chunk async for chunk in export.csv_rows(services.db.pool, reports.LogFilter())])
    (line,) = [x for x in csv.splitlines() if "no-such-model" in x]
    assert ",unknown," in line
