"""A dead process's journal, recovered by a live sibling: its rows once, its reservations that
no row settles released, and a live sibling's journal left alone. Files only: the database
side (vtai_release, the ledger) is in test_process_dies.py."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid

from vtai.cluster import layout
from vtai.metering.journal import Journal
from vtai.metering.replay import Replayer
from vtai.metering.spool import INFLIGHT, Spool

# Process 2 holds a turn's reservation and its row, a reservation no row names (a turn in
# flight), and a released one; then it is SIGKILLed.
DYING = """
import os, sys, uuid
from vtai.metering.journal import Journal
j = Journal(sys.argv[1])
settled, orphan, released = sys.argv[2:5]
j.reserve(settled, uuid.uuid4(), ttl=900)
j.reserve(orphan, sys.argv[5], ttl=900)
j.reserve(released, uuid.uuid4(), ttl=900)
j.unreserve(released)
j.hold({"litellm_call_id": "answered", "reservation_id": settled})
os.kill(os.getpid(), 9)
"""


async def test_a_live_process_recovers_a_dead_siblings_journal_but_not_a_live_ones(tmp_path):
    procs = [layout.process_dir(tmp_path, n) for n in (1, 2, 3)]
    settled, orphan, released, user = (str(uuid.uuid4()) for _ in range(4))
    dead = subprocess.run(
        [sys.executable, "-c", DYING, str(procs[1] / "spool" / INFLIGHT)]
        + [settled, orphan, released, user],
        check=False,
    )
    assert dead.returncode == -signal.SIGKILL
    # Process 3 is alive, with a row of its own in flight.
    live = Journal(procs[2] / "spool" / INFLIGHT)
    live.hold({"litellm_call_id": "still being written"})

    spool = Spool(procs[0] / "spool")
    released_now = []

    async def release(reservation_id, user_id):
        released_now.append((str(reservation_id), str(user_id)))
        return True

    replayer = Replayer(spool, write=None, is_bad_data=None)
    replayer.release = release
    replayer.peers = lambda: layout.peer_journals(procs[0])
    assert await replayer.recover() == 1
    assert released_now == [(orphan, user)]
    assert spool.status().waiting == 1
    assert list((procs[1] / "spool" / INFLIGHT).glob("*.jsonl")) == []
    assert live.path.exists()
    # Once: a second pass finds nothing more.
    assert await replayer.recover() == 0 and len(released_now) == 1
