"""Events about the database itself (a spool backlog while it is down), queued by the process:
in a small JSON file next to its spool, so a restart neither loses nor repeats them.

Delivered by vtai.notify.delivery with the same signature and backoff as the outbox, each URL
on its own; an event id already queued or sent is not queued again (the receiver dedupes by
id too). Several processes sharing the file take an exclusive lock around each change, and a
claimed delivery is leased as in the database, so no two send it at the same moment.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path

# Ids of delivered events kept to refuse a second copy.
KEEP_SENT = 200
# Past this, the oldest undelivered event is dropped: the file stays small whatever happens.
MAX_EVENTS = 100


class LocalQueue:
    def __init__(self, directory: Path):
        self.directory = directory
        self.path = directory / "queue.json"
        self._lock_path = directory / "queue.lock"

    @contextlib.contextmanager
    def _state(self):
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = json.loads(self.path.read_text()) if self.path.exists() else {}
            except (OSError, ValueError):
                state = {}
            state.setdefault("events", [])
            state.setdefault("sent", [])
            state.setdefault("episodes", {})
            before = json.dumps(state, sort_keys=True)
            yield state
            if json.dumps(state, sort_keys=True) != before:
                tmp = self.path.with_suffix(".tmp")
                with open(tmp, "w") as f:
                    json.dump(state, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)

    def add(self, event: dict, urls: tuple[str, ...], episode: str | None = None) -> bool:
        """Queue `event` for every URL; False when its id is queued or sent already, or when
        `episode` (a condition still going on) has had its event."""
        with self._state() as state:
            if episode is not None and episode in state["episodes"]:
                return False
            if event["id"] in state["sent"] or any(
                e["event"]["id"] == event["id"] for e in state["events"]
            ):
                return False
            state["events"].append(
                {
                    "event": event,
                    "urls": {u: {"attempts": 0, "next_at": 0, "error": None} for u in urls},
                }
            )
            del state["events"][:-MAX_EVENTS]
            if episode is not None:
                state["episodes"][episode] = event["id"]
            return True

    def end_episode(self, episode: str) -> None:
        """The condition is over: the next time it happens is a new event."""
        with self._state() as state:
            state["episodes"].pop(episode, None)

    def claim(self, lease: float, now: float | None = None) -> list[tuple[dict, str, int]]:
        now = time.time() if now is None else now
        claimed = []
        with self._state() as state:
            for entry in state["events"]:
                for url, d in entry["urls"].items():
                    if d["next_at"] <= now:
                        d["attempts"] += 1
                        d["next_at"] = now + lease
                        claimed.append((entry["event"], url, d["attempts"]))
        return claimed

    def done(self, event_id: str, url: str, attempt: int, error: str | None, base: float) -> None:
        with self._state() as state:
            for entry in state["events"]:
                if entry["event"]["id"] != event_id or url not in entry["urls"]:
                    continue
                d = entry["urls"][url]
                if error is None:
                    del entry["urls"][url]
                elif d["attempts"] == attempt:
                    # The outbox's backoff (functions/60_notify.sql, vtai_outbox_done).
                    d["next_at"] = time.time() + min(3600.0, base * 2 ** min(attempt - 1, 20))
                    d["error"] = error[:500]
            for entry in [e for e in state["events"] if not e["urls"]]:
                state["events"].remove(entry)
                state["sent"] = [*state["sent"], entry["event"]["id"]][-KEEP_SENT:]

    def pending(self) -> list[dict]:
        """What waits: one dict per event and URL (event id, type, url, attempts, error)."""
        with self._state() as state:
            return [
                {
                    "event_id": e["event"]["id"],
                    "type": e["event"]["type"],
                    "url": url,
                    "attempts": d["attempts"],
                    "last_error": d["error"],
                }
                for e in state["events"]
                for url, d in e["urls"].items()
            ]
