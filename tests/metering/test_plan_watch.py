"""vtai.metering.plan_watch: a plan change is heard at once, a lost connection is noticed and
listened on again, and a URL that can't carry NOTIFY never counts as live."""

from __future__ import annotations

import asyncio

import asyncpg

from vtai.metering.plan_watch import PlanWatch


async def _until(condition, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            if condition():
                return
            await asyncio.sleep(0.02)


async def test_a_plan_change_is_heard_and_a_lost_connection_listened_on_again(db_url, conn):
    heard = []
    watch = await PlanWatch(db_url, lambda: heard.append(1)).start()
    watch.retry = 0.05
    try:
        assert watch.live and len(heard) == 1  # anything may have changed before it listened
        await conn.execute("update tiers set rpm = null where name = 'free'")
        await _until(lambda: len(heard) == 2)
        pid = watch._conn.get_server_pid()
        await conn.execute("select pg_terminate_backend($1)", pid)
        await _until(lambda: not watch.live)
        # Held reservations go back the moment it is lost, and it listens again.
        await _until(lambda: watch.live and watch._conn.get_server_pid() != pid)
        await conn.execute("update model_weights set weight = weight")
        before = len(heard)
        await conn.execute("insert into model_weights (pattern, weight) values ('x/*', 2)")
        await _until(lambda: len(heard) > before)
    finally:
        await watch.stop()
    assert not watch.live


async def test_the_transaction_pooler_port_is_never_live(caplog):
    watch = await PlanWatch("postgresql://u:p@db.example:6543/postgres", lambda: None).start()
    assert not watch.live
    assert "transaction pooler (port 6543)" in caplog.text
    await watch.stop()


async def test_stop_closes_the_listening_connection(db_url):
    watch = await PlanWatch(db_url, lambda: None).start()
    conn: asyncpg.Connection = watch._conn
    await watch.stop()
    assert conn.is_closed() and not watch.live
