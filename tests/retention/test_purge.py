"""VTAI_CONTENT_RETENTION_DAYS: text past N days goes from the ledger and chat history; every
token, cost and count stays exactly as it was."""

from __future__ import annotations

import asyncpg

from tests.conftest import add_user
from tests.retention import seed
from vtai.retention import purge


async def test_purge_removes_old_text_and_keeps_billing_totals_exact(conn, db_url):
    ada, bob = await add_user(conn, "ada"), await add_user(conn, "bob")
    await seed.turns(conn, ada.id, 40, 7, "oldada")
    await seed.turns(conn, bob.id, 35, 5, "oldbob")
    await seed.turns(conn, ada.id, 2, 4, "newada")
    old_chat = await seed.chat(conn, ada.id, "ada", 40, "oldchat")
    new_chat = await seed.chat(conn, bob.id, "bob", 1, "newchat")
    before = await seed.totals(conn)

    # Another process holds the purge's lock: this one skips.
    other = await asyncpg.connect(db_url)
    try:
        await other.execute("select pg_advisory_lock($1)", purge.LOCK_KEY)
        assert await purge.purge(conn, 30) is None
    finally:
        await other.close()

    seen = []
    done = await purge.purge(conn, 30, batch=3, progress=lambda *a: seen.append(a))
    assert done.ledger_rows == 12 and done.steps == 2
    assert done.batches >= 4  # 3-id ranges, then history
    assert seen[-1][0] == "history"

    assert await seed.totals(conn) == before
    await seed.consistent(conn)
    text = lambda col: f"select count(*) from request_logs where {col}::text like '%secret%'"  # noqa: E731
    assert await conn.fetchval(text("messages")) == 4
    assert await conn.fetchval(text("response")) == 4
    assert await conn.fetchval(text("error")) == 2  # the two recent failures' messages
    old = await conn.fetch(
        "select messages, response, error from request_logs where session_id like '%old%'"
    )
    assert old and all(r["messages"] is None and r["response"] is None for r in old)
    assert all(r["error"] in (None, "null") or "class" in r["error"] for r in old)

    steps = await conn.fetch('select "threadId", output from "Step"')
    assert {r["output"] for r in steps if r["threadId"] == old_chat} == {""}
    assert all("newchat" in r["output"] for r in steps if r["threadId"] == new_chat)
    names = dict(await conn.fetch('select id, name from "Thread"'))
    assert names == {old_chat: None, new_chat: "title newchat"}
    comments = await conn.fetch('select comment from "Feedback" order by comment nulls first')
    assert [r["comment"] for r in comments] == [None, "secret newchat comment"]

    # A second run finds nothing left to do.
    again = await purge.purge(conn, 30)
    assert (again.ledger_rows, again.steps) == (0, 0)
