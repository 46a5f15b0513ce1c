"""A durable local spool for ledger rows the database could not take.

One JSON record per line, appended and fsynced before the write is considered done. Replay
renames the file first, so new rows keep arriving in a fresh one, and sends each record
through the same idempotent database function as a live write: a crash mid-replay just means
the next replay sends some rows again, which the database ignores. A line that can't be
parsed (a crash mid-write) or that the database rejects as bad data goes to quarantine.jsonl
with the reason: kept, reported, and never blocking the lines after it.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from vtai.metering.journal import Hold, Journal, recover
from vtai.ops import metrics

ACTIVE = "ledger.jsonl"
QUARANTINE = "quarantine.jsonl"
INFLIGHT = "inflight"


class ReplayStopped(Exception):
    """The database stopped answering during replay; what is left stays spooled."""


@dataclass
class ReplayResult:
    recorded: int = 0
    duplicates: int = 0
    quarantined: int = 0
    remaining: int = 0


@dataclass
class SpoolStatus:
    waiting: int
    quarantined: int
    oldest: float | None


def _count_lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        return 0


def _replace_durably(path: Path, content: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Spool:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._journal: Journal | None = None

    def _ensure_dir(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _locked(self, name: str = ".append.lock"):
        """An exclusive lock shared by every process using this spool directory."""
        self._ensure_dir()
        handle = open(self.directory / name, "a")  # noqa: SIM115 - closed by the caller
        fcntl.flock(handle, fcntl.LOCK_EX)
        return handle

    def _rotate(self) -> None:
        """Move the active file aside so appends continue while it is replayed."""
        handle = self._locked()
        try:
            active = self.directory / ACTIVE
            if active.exists():
                active.rename(self.directory / f"replaying-{time.time_ns()}.jsonl")
        finally:
            handle.close()

    def append(self, record: dict) -> None:
        """Durably add one record. Blocking: call it from a thread in async code."""
        self.append_many([record])

    def append_many(self, records: list[dict]) -> None:
        """Durably add records with one fsync. Blocking: call it from a thread."""
        data = b"".join(
            (json.dumps(r, ensure_ascii=True, default=str) + "\n").encode() for r in records
        )
        with self._lock:
            handle = self._locked()
            try:
                fd = os.open(self.directory / ACTIVE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            finally:
                handle.close()
        metrics.spooled(len(records))

    def journal(self) -> Journal:
        """This process's journal (vtai.metering.journal), made on first use."""
        if self._journal is None:
            self._journal = Journal(self.directory / INFLIGHT)
        return self._journal

    def hold(self, record: dict, text: str | None = None) -> Hold:
        """Keep a copy of a row whose database write is under way (see vtai.metering.journal)."""
        return self.journal().hold(record, text)

    def recover_inflight(self) -> int:
        """Move rows left in flight by dead processes into the spool; returns how many."""
        self._ensure_dir()
        return recover(self.directory / INFLIGHT, self.append_many, self.quarantine)

    @property
    def in_flight(self) -> int:
        """Rows this process holds whose write has not settled yet."""
        return self._journal.pending if self._journal is not None else 0

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()

    def pending_files(self) -> list[Path]:
        if not self.directory.exists():
            return []
        files = sorted(self.directory.glob("replaying-*.jsonl"))
        active = self.directory / ACTIVE
        return files + ([active] if active.exists() else [])

    def status(self) -> SpoolStatus:
        files = self.pending_files()
        oldest = min((f.stat().st_mtime for f in files), default=None)
        waiting = sum(_count_lines(f) for f in files)
        return SpoolStatus(waiting, _count_lines(self.directory / QUARANTINE), oldest)

    def quarantine(self, raw: bytes, reason: str) -> None:
        entry = {"reason": reason, "line": raw.decode("utf-8", "replace"), "at": time.time()}
        with (self.directory / QUARANTINE).open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        metrics.quarantined()

    async def replay(
        self,
        send: Callable[[dict], Awaitable[bool]],
        is_bad_data: Callable[[BaseException], bool],
    ) -> ReplayResult:
        """Send every spooled record with `send` (True: written, False: already there).

        Stops at the first error that is not bad data, leaving the rest for later.
        """
        result = ReplayResult()
        # One replayer at a time per spool; appends only wait for the rename.
        handle = await asyncio.to_thread(self._locked, ".replay.lock")
        try:
            await asyncio.to_thread(self._rotate)
            for path in sorted(self.directory.glob("replaying-*.jsonl")):
                lines = path.read_bytes().splitlines()
                for index, raw in enumerate(lines):
                    if not raw.strip():
                        continue
                    try:
                        record = json.loads(raw)
                        if not isinstance(record, dict) or "litellm_call_id" not in record:
                            raise ValueError("not a ledger record")
                    except ValueError as exc:
                        await asyncio.to_thread(self.quarantine, raw, f"unreadable: {exc}")
                        result.quarantined += 1
                        continue
                    try:
                        written = await send(record)
                    except Exception as exc:
                        if is_bad_data(exc):
                            reason = f"rejected by the database: {type(exc).__name__}: {exc}"
                            await asyncio.to_thread(self.quarantine, raw, reason)
                            result.quarantined += 1
                            continue
                        # Keep this line and the rest; lines before it are safely in the DB.
                        rest = b"\n".join(lines[index:]) + b"\n"
                        await asyncio.to_thread(_replace_durably, path, rest)
                        result.remaining = sum(_count_lines(f) for f in self.pending_files())
                        raise ReplayStopped(str(exc)) from exc
                    if written:
                        result.recorded += 1
                    else:
                        result.duplicates += 1
                path.unlink()
        finally:
            handle.close()
        return result
