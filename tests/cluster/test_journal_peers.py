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


# A turn in flight when its process is killed: its prompt went out and 20 tokens streamed
# (progress is written every 8, so recovery knows 16 of them). Another turn had reserved but
# sent nothing yet.
KILLED_MID_ANSWER = """
import os, sys
from vtai.metering.journal import Journal
j = Journal(sys.argv[1])
sending, waiting, user = sys.argv[2:5]
j.reserve(sending, user, ttl=900)
j.reserve(waiting, user, ttl=900)
row = {"litellm_call_id": "cut", "reservation_id": sending, "end_user": user, "status": "failure",
       "prompt_tokens": 100, "completion_tokens": 0, "total_tokens": 100, "total_cost": 0.001,
       "additional_details": {"process_died": True, "streamed_tokens": 0}}
j.in_flight(sending, row, 0.00002)
for n in range(1, 21):
    if n % 8 == 0:
        j.streamed(sending, n)
os.kill(os.getpid(), 9)
"""


async def test_a_turn_killed_mid_answer_is_settled_with_its_prompt_and_streamed_tokens(tmp_path):
    procs = [layout.process_dir(tmp_path, n) for n in (1, 2)]
    sending, waiting, user = (str(uuid.uuid4()) for _ in range(3))
    dead = subprocess.run(
        [sys.executable, "-c", KILLED_MID_ANSWER, str(procs[1] / "spool" / INFLIGHT)]
        + [sending, waiting, user],
        check=False,
    )
    assert dead.returncode == -signal.SIGKILL
    spool = Spool(procs[0] / "spool")
    released_now = []

    async def release(reservation_id, user_id):
        released_now.append(str(reservation_id))
        return True

    replayer = Replayer(spool, write=None, is_bad_data=None)
    replayer.release = release
    replayer.peers = lambda: layout.peer_journals(procs[0])
    assert await replayer.recover() == 1
    # The turn that sent nothing is released; the one mid-answer is settled by its row.
    assert released_now == [waiting]
    recorded = []

    async def write(row):
        recorded.append(row)
        return True

    await spool.replay(write, lambda exc: False)
    (row,) = recorded
    assert row["reservation_id"] == sending and row["litellm_call_id"] == "cut"
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (100, 16, 116)
    assert abs(row["total_cost"] - (0.001 + 16 * 0.00002)) < 1e-12
    assert row["additional_details"]["streamed_tokens"] == 16


def test_a_compacted_journal_keeps_the_in_flight_turn(tmp_path):
    """Compaction (no row pending, a big file) rewrites only what is held: the in-flight row
    and its progress must survive it."""
    from vtai.metering import journal as journal_module

    j = Journal(tmp_path)
    rid, user = str(uuid.uuid4()), str(uuid.uuid4())
    j.reserve(rid, user, ttl=900)
    j.in_flight(rid, {"litellm_call_id": "c", "reservation_id": rid, "prompt_tokens": 5,
                      "total_cost": None}, None)  # fmt: skip
    j.streamed(rid, 8)
    filler = j.hold({"litellm_call_id": "x" * (journal_module.COMPACT_BYTES + 10)})
    filler.release()  # nothing pending and the file is big: compacted
    text = j.path.read_text()
    assert '"flight"' in text and '"streamed"' in text and '"x' not in text
    saved = []
    j2 = tmp_path / "copy.jsonl"
    j2.write_text(text)
    j.path.unlink()
    journal_module.recover(tmp_path, saved.extend, lambda raw, why: None, lambda orphans: None)
    (row,) = saved
    assert row["completion_tokens"] == 8 and row["total_cost"] is None
    assert row["additional_details"]["cost_unknown"] is True
