"""Rows whose database write is under way, kept on local disk until it settles.

One append-only journal per process: a hold is one line, a release another, each written
with a single write() so a dying process leaves whole lines. Nothing is fsynced, on purpose:
this guards against the process dying (the page cache survives that) for a few microseconds
per row, where a file per row cost a create and an unlink; a failed write still goes through
the spool's fsynced append. The journal is locked while its process lives, so a sibling
process that starts up never takes rows that are still being written.
"""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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

    def _open(self) -> int:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = self.directory / f"{os.getpid()}-{uuid.uuid4().hex[:12]}.jsonl"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        # Held until this process exits, however it exits: the kernel drops it.
        fcntl.flock(fd, fcntl.LOCK_EX)
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
        return Hold(row, text, self, self._next)

    def release(self, number: int) -> None:
        self.release_many([number])

    def release_many(self, numbers: list[int]) -> None:
        """Forget settled rows with one write: a batch's rows settle together."""
        settled = [n for n in numbers if n in self._pending]
        if not settled:
            return
        self._pending.difference_update(settled)
        if not self._pending and self._size > COMPACT_BYTES:
            os.ftruncate(self._fd, 0)
            self._size = 0
        else:
            self._write(f'{{"done": {json.dumps(settled)}}}\n')

    @property
    def pending(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        """Only once nothing is pending: the file then holds nothing to recover."""
        if self._fd is not None and not self._pending:
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


def recover(
    directory: Path,
    save: Callable[[list[dict]], None],
    quarantine: Callable[[bytes, str], None],
) -> int:
    """Hand the unreleased rows of dead processes' journals to `save`; returns how many."""
    moved = 0
    for path in sorted(Path(directory).glob("*.jsonl")):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its process is alive and still writing these rows
            held: dict[int, dict] = {}
            with open(fd, "rb", closefd=False) as f:
                for raw in f:
                    try:
                        entry = json.loads(raw)
                        if "hold" in entry:
                            held[entry["hold"]] = entry["row"]
                        else:
                            for number in entry["done"]:
                                held.pop(number, None)
                    except (ValueError, KeyError, TypeError) as exc:
                        quarantine(raw.rstrip(b"\n"), f"unreadable in-flight row: {exc}")
            if held:
                save(list(held.values()))
                moved += len(held)
            path.unlink()
        finally:
            os.close(fd)
    return moved
