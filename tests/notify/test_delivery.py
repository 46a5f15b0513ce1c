"""Webhook delivery from the outbox, against a real Postgres and a real local HTTP receiver
(tests/notify/receiver.py): the documented signature check, at least once across a sender that
dies, and never the same delivery from two processes at once (real OS processes running the
app's delivery loop, tests/notify/deliver_worker.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import asyncpg
import pytest

from tests.conftest import ROOT
from tests.notify.receiver import Receiver
from vtai.notify import outbox, signing
from vtai.notify.delivery import Deliverer
from vtai.notify.local import LocalQueue

SECRET = "whsec-test-0123456789abcdef"


def documented_verify():
    """The `verify` function exactly as docs/operations.md prints it."""
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("### Verifying a delivery", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "docs/operations.md", "exec"), namespace)
    return namespace["verify"]


@pytest.fixture(scope="module")
def receiver():
    r = Receiver().start()
    yield r
    r.stop()


async def _events(conn, n: int, type_: str = "test.event") -> list[str]:
    return [
        str(
            await conn.fetchval(
                "select vtai_outbox_add($1, $2::text::jsonb)", type_, f'{{"n":{i}}}'
            )
        )
        for i in range(n)
    ]


async def _all_delivered(conn, ids: list[str], timeout: float = 60.0) -> None:
    """Delivered as the database records it (by other processes: polled)."""
    async with asyncio.timeout(timeout):
        while True:
            left = await conn.fetchval(
                "select count(*) from webhook_deliveries where event_id = any($1::uuid[])"
                " and delivered_at is null",
                ids,
            )
            if not left:
                return
            await asyncio.sleep(0.05)


def _worker(db_url: str, lease: float, *urls: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.notify.deliver_worker", db_url, SECRET, str(lease), *urls],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _end(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, sig)
    proc.wait(10)


async def test_the_documented_sample_verifies_a_real_delivery_and_rejects_a_tampered_body(
    db_url, conn, receiver, tmp_path
):
    verify = documented_verify()
    url = receiver.url("ok")
    await conn.fetchval("select vtai_webhook_endpoints_set($1)", [url])
    (event_id,) = [
        str(await conn.fetchval("select vtai_outbox_add('test.event', '{\"name\": \"Zoë\"}')"))
    ]
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    deliverer = Deliverer(outbox.PoolCalls(pool), (url,), SECRET, LocalQueue(tmp_path)).start()
    try:
        (got,) = await receiver.wait_for(
            lambda: [d for d in receiver.of("ok") if d.event["id"] == event_id]
        )
        await _all_delivered(conn, [event_id])
    finally:
        await deliverer.stop()
        await pool.close()
    header = got.headers[signing.HEADER]
    assert got.event["type"] == "test.event" and got.event["data"] == {"name": "Zoë"}
    assert got.headers["VTAI-Event-Id"] == event_id and isinstance(got.event["created"], int)
    assert verify(SECRET, header, got.body)
    assert not verify(SECRET, header, got.body.replace("Zoë".encode(), b"Zoe"))
    assert not verify("another secret", header, got.body)
    assert not verify(SECRET, signing.signature(SECRET, got.body, at=1), got.body)  # too old


async def test_two_processes_send_every_event_once_and_never_one_at_the_same_moment(
    db_url, conn, receiver
):
    url = receiver.url("ok")
    await conn.fetchval("select vtai_webhook_endpoints_set($1)", [url])
    ids = await _events(conn, 150)
    workers = [_worker(db_url, 30, url), _worker(db_url, 30, url)]
    try:
        await _all_delivered(conn, ids)
    finally:
        for w in workers:
            _end(w)
    counts = {}
    for d in receiver.of("ok"):
        counts[d.event["id"]] = counts.get(d.event["id"], 0) + 1
    assert {i: counts.get(i) for i in ids} == {i: 1 for i in ids}
    assert receiver.most_at_once == 1
    # Both processes took a share (SKIP LOCKED: neither waited for the other's claim).
    assert await conn.fetchval("select max(attempts) from webhook_deliveries") == 1


async def test_an_event_claimed_by_a_process_that_dies_is_delivered_after_the_lease(
    db_url, conn, receiver
):
    url = receiver.url("hang-once")
    lease = 2.0
    await conn.fetchval("select vtai_webhook_endpoints_set($1)", [url])
    (event_id,) = await _events(conn, 1, "test.crash")
    first = _worker(db_url, lease, url)
    try:
        # The first sender is mid-send (the receiver holds the request open) when it dies.
        await receiver.wait_for(lambda: receiver.of("hang-once", "test.crash"))
    finally:
        _end(first, signal.SIGKILL)
    second = _worker(db_url, lease, url)  # the restart
    try:
        await _all_delivered(conn, [event_id])
    finally:
        _end(second)
    sends = [d for d in receiver.of("hang-once") if d.event["id"] == event_id]
    assert len(sends) == 2  # at least once: the receiver dedupes by id
    assert sends[1].at - sends[0].at >= lease - 0.2  # not before the dead sender's lease ended
    assert await conn.fetchval("select attempts from webhook_deliveries") == 2


async def test_a_spool_backlog_is_queued_by_the_process_once_and_sent_signed(receiver, tmp_path):
    """The database is what is down: no outbox (calls=None), the process's own queue."""
    from datetime import UTC, datetime

    from vtai.metering.spool import Spool

    spool = Spool(tmp_path / "spool")
    spool.append_many(
        [
            {"litellm_call_id": f"c{i}", "created_at": datetime.now(UTC).isoformat()}
            for i in range(3)
        ]
    )
    url = receiver.url("ok")
    queue = LocalQueue(tmp_path / "webhooks")
    deliverer = Deliverer(None, (url,), SECRET, queue, spool=spool, spool_rows=2).open()
    try:
        assert await deliverer.run_once() == 1  # queued and sent in one pass
        assert not await deliverer.check_spool()  # the same backlog: no second event
    finally:
        await deliverer.stop()
    (sent,) = receiver.of("ok", "spool.backlog")
    assert queue.pending() == []
    assert sent.event["data"]["rows"] == 3
    assert documented_verify()(SECRET, sent.headers["VTAI-Signature"], sent.body)
    # After a restart the same id is refused (the receiver dedupes by id too).
    assert not LocalQueue(tmp_path / "webhooks").add(sent.event, (url,))
