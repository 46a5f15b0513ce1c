"""Rows whose database write is under way, kept on local disk until it settles.

One append-only journal per process: a hold is one line, a release another, each written
with a single write() so a dying process leaves whole lines. Nothing is fsynced, on purpose:
this guards against the process dying (the page cache survives that) for a few microseconds
per row, where a file per row cost a create and an unlink; a failed write still goes through
the spool's fsynced append. The journal is locked while its process lives, so a sibling
process that starts up never takes rows that are still being written.

It also lists the reservations the process holds (JournaledGate): one a turn's row names is
settled by that row; the others, left by a process that died, are released at recovery
instead of waiting out their TTL. A turn whose prompt went out (in_flight) is not released but
settled: recovery writes the row the turn left, charged its prompt and the tokens that had
streamed (streamed), as a stopped turn is charged. Recovery reads any directory: a process's
own at start-up, or a sibling's (vtai.cluster.layout), whose lock then says whether its owner
is alive.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

log = logging.getLogger(__name__)

# Once nothing is pending, a journal larger than this starts again from empty.
COMPACT_BYTES = 1 << 20


@dataclass
class Hold:
    row: dict
    # the row as JSON, encoded once for the journal and again usable for the database
    text: str
    journal: Journal
    number: int

    def release(self) -> None:
        """The row is in the database or the spool: forget the copy."""
        self.journal.release(self.number)


class Journal:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.path: Path | None = None
        self._fd: int | None = None
        self._size = 0
        self._next = 0
        self._pending: set[int] = set()
        # reservation id -> (entry number, its line, when): held, no row names it yet
        self._reserved: dict[str, tuple[int, str, float]] = {}
        # reservation id -> [its in-flight row's line, the last streamed line or None]
        self._flights: dict[str, list] = {}

    def _open(self) -> int:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        name = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        # Locked under a name recovery skips, then renamed: no recoverer ever sees the file
        # unlocked, which it would take for a dead process's.
        building = self.directory / f"{name}.new"
        fd = os.open(building, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        # Held until this process exits, however it exits: the kernel drops it.
        fcntl.flock(fd, fcntl.LOCK_EX)
        self.path = self.directory / f"{name}.jsonl"
        os.rename(building, self.path)
        self._fd = fd
        return fd

    def _write(self, line: str) -> None:
        fd = self._fd if self._fd is not None else self._open()
        data = line.encode()
        os.write(fd, data)
        self._size += len(data)

    def hold(self, row: dict, text: str | None = None) -> Hold:
        """`text`: the row's JSON, if the caller has it already."""
        if text is None:
            text = json.dumps(row, ensure_ascii=False, default=str)
        self._next += 1
        self._write(f'{{"hold": {self._next}, "row": {text}}}\n')
        self._pending.add(self._next)
        # The row names its reservation: recovery settles it with the row, not a release.
        self._reserved.pop(str(row.get("reservation_id")), None)
        self._flights.pop(str(row.get("reservation_id")), None)
        return Hold(row, text, self, self._next)

    def in_flight(self, reservation_id, row: dict, completion_price: float | None) -> None:
        """The turn holding this reservation sent its prompt. `row`: what the turn is charged
        if the process dies before its own row is held (the prompt, no answer yet), and
        `completion_price` what each streamed token adds to its cost (None: unknown)."""
        rid = str(reservation_id)
        if rid not in self._reserved:
            return  # not a reservation recovery would find
        line = json.dumps(
            {"flight": rid, "price": completion_price, "row": row},
            ensure_ascii=False,
            default=str,
        )
        self._write(line + "\n")
        self._flights[rid] = [line + "\n", None]

    def streamed(self, reservation_id, completion_tokens: int) -> None:
        """So many answer tokens of the in-flight turn have streamed (its last word counts)."""
        flight = self._flights.get(str(reservation_id))
        if flight is None:
            return
        line = f'{{"streamed": "{reservation_id}", "tokens": {int(completion_tokens)}}}\n'
        self._write(line)
        flight[1] = line

    def reserve(self, reservation_id: uuid.UUID, user_id: uuid.UUID, ttl: float) -> None:
        """A reservation this process now holds, until a row names it or it is released."""
        now = time.monotonic()
        # Past its TTL the database has given it back already: nothing left to recover.
        for rid, (_, _, at) in list(self._reserved.items()):
            if now - at > ttl:
                del self._reserved[rid]
                self._flights.pop(rid, None)
        self._next += 1
        line = json.dumps({"reserve": self._next, "id": str(reservation_id), "user": str(user_id)})
        self._write(line + "\n")
        self._reserved[str(reservation_id)] = (self._next, line + "\n", now)

    def unreserve(self, reservation_id: uuid.UUID) -> None:
        """The reservation went back to the database (or was tried: its TTL does the rest)."""
        entry = self._reserved.pop(str(reservation_id), None)
        self._flights.pop(str(reservation_id), None)
        if entry is not None:
            self._write(f'{{"done": [{entry[0]}]}}\n')

    def release(self, number: int) -> None:
        self.release_many([number])

    def release_many(self, numbers: list[int]) -> None:
        """Forget settled rows with one write: a batch's rows settle together."""
        settled = [n for n in numbers if n in self._pending]
        if not settled:
            return
        self._pending.difference_update(settled)
        if not self._pending and self._size > COMPACT_BYTES:
            # No row is pending, so the file need only say which reservations are held.
            os.ftruncate(self._fd, 0)
            self._size = 0
            if self._reserved:
                self._write(
                    "".join(line for _, line, _ in self._reserved.values())
                    + "".join(
                        flight + (streamed or "") for flight, streamed in self._flights.values()
                    )
                )
        else:
            self._write(f'{{"done": {json.dumps(settled)}}}\n')

    @property
    def pending(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        """Only once nothing is pending: the file then holds nothing to recover."""
        if self._fd is not None and not self._pending and not self._reserved:
            os.close(self._fd)
            self._fd = None
            self.path.unlink(missing_ok=True)


def release_all(holds: list[Hold]) -> None:
    """Release holds together: one journal write per journal."""
    by_journal: dict[int, tuple[Journal, list[int]]] = {}
    for held in holds:
        by_journal.setdefault(id(held.journal), (held.journal, []))[1].append(held.number)
    for journal, numbers in by_journal.values():
        journal.release_many(numbers)


@dataclass
class Orphan:
    """A reservation a dead process held that no row of its settles."""

    reservation_id: str
    user_id: str


def cut_short(row: dict, completion_price: float | None, streamed: int) -> dict:
    """An in-flight turn's row once its process died: the prompt it was charged, plus the
    `streamed` answer tokens at `completion_price` each."""
    row = dict(row)
    streamed = max(int(streamed), 0)
    row["completion_tokens"] = streamed
    row["total_tokens"] = int(row.get("prompt_tokens") or 0) + streamed
    details = dict(row.get("additional_details") or {})
    details["streamed_tokens"] = streamed
    if row.get("total_cost") is not None and (completion_price is not None or not streamed):
        row["total_cost"] = row["total_cost"] + streamed * (completion_price or 0)
    else:
        row["total_cost"] = None
        details["cost_unknown"] = True
    row["additional_details"] = details
    return row


def recover(
    directory: Path,
    save: Callable[[list[dict]], None],
    quarantine: Callable[[bytes, str], None],
    orphans: Callable[[list[Orphan]], None] | None = None,
) -> int:
    """Hand the unreleased rows of dead processes' journals to `save`, and their reservations
    no row settles to `orphans` (None: left to their TTL); returns how many rows."""
    moved = 0
    for path in sorted(Path(directory).glob("*.jsonl")):
        try:
            fd = os.open(path, os.O_RDONLY)
        except (FileNotFoundError, PermissionError):
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its process is alive and still writing these rows
            if not _still_there(path, fd):
                continue  # another recoverer took it while we waited for the lock
            held: dict[int, dict] = {}
            reserved: dict[int, Orphan] = {}
            named: set[str] = set()
            # reservation id -> (its in-flight row, price per answer token); tokens streamed
            flights: dict[str, tuple[dict, float | None]] = {}
            streamed: dict[str, int] = {}
            with open(fd, "rb", closefd=False) as f:
                for raw in f:
                    try:
                        entry = json.loads(raw)
                        if "hold" in entry:
                            held[entry["hold"]] = entry["row"]
                            named.add(str(entry["row"].get("reservation_id")))
                        elif "reserve" in entry:
                            reserved[entry["reserve"]] = Orphan(entry["id"], entry["user"])
                        elif "flight" in entry:
                            flights[entry["flight"]] = (entry["row"], entry["price"])
                        elif "streamed" in entry:
                            streamed[entry["streamed"]] = int(entry["tokens"])
                        else:
                            for number in entry["done"]:
                                held.pop(number, None)
                                reserved.pop(number, None)
                    except (ValueError, KeyError, TypeError, AttributeError) as exc:
                        quarantine(raw.rstrip(b"\n"), f"unreadable in-flight row: {exc}")
            left = [o for o in reserved.values() if o.reservation_id not in named]
            # A turn cut mid-answer is settled by its row, charged what went out; a
            # reservation nothing was sent for goes back.
            rows = list(held.values()) + [
                cut_short(*flights[o.reservation_id], streamed.get(o.reservation_id, 0))
                for o in left
                if o.reservation_id in flights
            ]
            left = [o for o in left if o.reservation_id not in flights]
            if rows:
                save(rows)
                moved += len(rows)
            if left and orphans is not None:
                orphans(left)
            path.unlink()
        finally:
            os.close(fd)
    return moved


def _still_there(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


class JournaledGate:
    """A gate (vtai.metering.ports.UsageGate) whose grants are written to the process's
    journal, so a process killed mid-turn or with a chat's next turn reserved ahead leaves
    them for recovery to release."""

    def __init__(self, gate, spool, ttl: float):
        self.gate = gate
        self.spool = spool
        self.ttl = ttl

    def _journal(self) -> Journal:
        # The spool's journal (one per process), made there if no row was held yet.
        return self.spool.journal()

    async def reserve(self, user_id, *args, **kwargs):
        grant = await self.gate.reserve(user_id, *args, **kwargs)
        if grant.granted and grant.reservation_id is not None:
            try:
                self._journal().reserve(grant.reservation_id, user_id, self.ttl)
            except OSError as exc:
                log.warning("journal write failed (%s): reservation left to its TTL", exc)
        return grant

    async def release(self, reservation_id, user_id) -> bool:
        try:
            return await self.gate.release(reservation_id, user_id)
        finally:
            try:
                self._journal().unreserve(reservation_id)
            except OSError as exc:
                log.warning("journal write failed (%s)", exc)

    async def usage(self, user_id, now: datetime | None = None):
        return await self.gate.usage(user_id, now)

    def __getattr__(self, name: str):
        # Anything else the wrapped gate offers (daily, the REST store's calls).
        return getattr(self.gate, name)
