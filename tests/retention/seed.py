"""Ledger rows and chat history as the app leaves them, for the retention tests."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

TOTALS = """
select (select coalesce(sum(total_tokens), 0) from request_logs) as ledger_tokens,
       (select coalesce(sum(total_cost), 0) from request_logs) as ledger_cost,
       (select count(*) from request_logs) as ledger_rows,
       (select coalesce(sum(used), 0) from usage_counters) as counter_used,
       (select coalesce(sum(cost_used), 0) from usage_counters) as counter_cost,
       (select coalesce(sum(total_tokens), 0) from usage_aggregates where granularity = 'day')
         as day_tokens,
       (select coalesce(sum(cost), 0) from usage_aggregates where granularity = 'hour')
         as hour_cost,
       (select coalesce(sum(requests), 0) from usage_aggregates where granularity = 'day')
         as day_requests
"""


async def totals(conn) -> dict:
    return dict(await conn.fetchrow(TOTALS))


async def consistent(conn) -> None:
    assert await conn.fetch("select * from vtai_verify_counters()") == []
    assert await conn.fetch("select * from vtai_verify_aggregates()") == []


async def turns(conn, user_id, days_ago: float, n: int, word: str) -> list[str]:
    """`n` answered turns of `user_id` made `days_ago` days ago, their text holding `word`."""
    at = datetime.now(UTC) - timedelta(days=days_ago)
    rows = []
    for i in range(n):
        rows.append(
            {
                "litellm_call_id": str(uuid.uuid4()),
                "created_at": (at + timedelta(seconds=i)).isoformat(),
                "end_user": str(user_id),
                "session_id": f"chat-{word}",
                "status": "success" if i % 3 else "failure",
                "model": "gpt-4o-mini",
                "prompt_tokens": 10 + i,
                "completion_tokens": 5 + i,
                "total_cost": 0.00012345 * (i + 1),
                "messages": [{"role": "user", "content": f"secret {word} question {i}"}],
                "response": {"content": f"secret {word} answer {i}"},
                "error": None
                if i % 3
                else {"class": "APIError", "code": "500", "message": f"echo secret {word}"},
            }
        )
    await conn.execute("select vtai_record_batch($1::text::jsonb)", json.dumps(rows))
    return [r["litellm_call_id"] for r in rows]


async def chat(conn, user_id, username: str, days_ago: float, word: str) -> str:
    """A stored chat of two steps (Chainlit's tables) and a rating with a comment."""
    at = datetime.now(UTC) - timedelta(days=days_ago)
    await conn.execute(
        'insert into "User" (id, identifier) values ($1, $2) on conflict do nothing',
        str(user_id),
        username,
    )
    thread = str(uuid.uuid4())
    await conn.execute(
        'insert into "Thread" (id, "createdAt", name, "userId") values ($1, $2, $3, $4)',
        thread,
        at,
        f"title {word}",
        str(user_id),
    )
    steps = [str(uuid.uuid4()), str(uuid.uuid4())]
    for step, kind in zip(steps, ("user_message", "assistant_message"), strict=True):
        await conn.execute(
            'insert into "Step" (id, "createdAt", "threadId", type, input, output)'
            " values ($1, $2, $3, $4, $5, $6)",
            step,
            at,
            thread,
            kind,
            "",
            f"secret {word} {kind}",
        )
    await conn.execute(
        'insert into "Feedback" ("stepId", name, value, comment) values ($1, $2, 1, $3)',
        steps[1],
        "rating",
        f"secret {word} comment",
    )
    return thread
