"""What `vtai webhooks status` and the /admin Webhooks panel show: per URL, what was delivered,
what waits, what fails and why; the newest failures; and this process's own queue."""

from __future__ import annotations

import asyncio
from datetime import datetime

from vtai.notify import outbox
from vtai.notify.local import LocalQueue


def _json(value):
    return value.isoformat() if isinstance(value, datetime) else value


async def gather(calls: outbox.Calls, queue: LocalQueue | None, urls: tuple[str, ...]) -> dict:
    endpoints = await outbox.status(calls)
    failures = await outbox.failures(calls, 20)
    local = await asyncio.to_thread(queue.pending) if queue is not None else []
    return {
        "enabled": bool(urls),
        "configured": list(urls),
        "endpoints": [{k: _json(v) for k, v in r.items()} for r in endpoints],
        "failures": [
            {k: str(v) if k == "event_id" else _json(v) for k, v in r.items()} for r in failures
        ],
        "local": local,
    }


def lines(found: dict) -> list[str]:
    """The status as the CLI prints it."""
    out = []
    if not found["enabled"]:
        out.append("webhooks are off here: set VTAI_WEBHOOK_URLS (and VTAI_WEBHOOK_SECRET)")
    if not found["endpoints"]:
        out.append("no webhook URL has been used yet")
    for e in found["endpoints"]:
        state = "active" if e["active"] else "inactive (not in VTAI_WEBHOOK_URLS)"
        out.append(
            f"{e['url']}: {state}; {e['delivered']} delivered, {e['pending']} pending,"
            f" {e['failing']} failing (retried), {e['failed']} given up"
        )
        if e["last_error"]:
            out.append(f"  last error {e['last_error_at']}: {e['last_error']}")
    for f in found["failures"][:10]:
        when = f"given up {f['failed_at']}" if f["failed_at"] else f"next {f['next_attempt_at']}"
        out.append(
            f"  {f['type']} {f['event_id']} -> {f['url']}: {f['attempts']} attempts,"
            f" {f['last_error']} ({when})"
        )
    if found["local"]:
        out.append(
            f"this host's own queue (events while the database is down): {len(found['local'])}"
        )
        for d in found["local"]:
            out.append(
                f"  {d['type']} {d['event_id']} -> {d['url']}: {d['attempts']} attempts,"
                f" {d['last_error']}"
            )
    return out


async def admin(pool) -> dict:
    """The /admin panel's JSON (this process's settings say what is configured)."""
    from vtai.notify import delivery
    from vtai.settings import load_settings
    from vtai.ui import chat

    try:
        settings = chat.services().settings
    except RuntimeError:  # the routes without the app's services (tests build them so)
        settings = load_settings()
    found = await gather(
        outbox.PoolCalls(pool), delivery.queue_for(settings), settings.webhook_urls
    )
    return found


async def retry(pool) -> int:
    return await outbox.retry(outbox.PoolCalls(pool))
