"""`vtai webhooks status` and `vtai webhooks retry`: the operator webhooks' deliveries
(vtai.notify.delivery), from any shell, against the app's database."""

from __future__ import annotations

import argparse

from vtai.settings import NEEDS_DATABASE, Settings


async def _with_calls(settings: Settings, work) -> int:
    from vtai.cli import CliError
    from vtai.db.connection import Database
    from vtai.notify import outbox

    if settings.rest_metering:
        raise CliError(f"`vtai webhooks` {NEEDS_DATABASE}")
    db = await Database(settings, pool_size=2).open()
    try:
        return await work(outbox.PoolCalls(db.pool))
    finally:
        await db.close()


async def status(settings: Settings, args: argparse.Namespace) -> int:
    """One line per URL, the newest failures, and this host's own queue. Exit 1 when a
    delivery has been given up on (`vtai webhooks retry` sends it again)."""
    from vtai.notify import delivery, report

    async def work(calls) -> int:
        found = await report.gather(calls, delivery.queue_for(settings), settings.webhook_urls)
        for line in report.lines(found):
            print(line)
        return 1 if any(e["failed"] for e in found["endpoints"]) else 0

    return await _with_calls(settings, work)


async def retry(settings: Settings, args: argparse.Namespace) -> int:
    from vtai.notify import outbox

    async def work(calls) -> int:
        n = await outbox.retry(calls)
        print(f"{n} undelivered deliveries are due now; a running app sends them within seconds")
        return 0

    return await _with_calls(settings, work)


async def off(settings: Settings, args: argparse.Namespace) -> int:
    """Stop writing events for every URL: an app process without VTAI_WEBHOOK_URLS leaves the
    URLs the others deliver to alone, so turning webhooks off everywhere is this command."""
    from vtai.notify import outbox

    async def work(calls) -> int:
        await outbox.set_endpoints(calls, ())
        print("webhooks are off: no event is written until a process starts with VTAI_WEBHOOK_URLS")
        return 0

    return await _with_calls(settings, work)


def register(sub, user) -> None:
    """Add this module's commands: `sub` is vtai's subcommands, `user` those of `vtai user`."""
    hooks = sub.add_parser(
        "webhooks", help="the operator webhooks: deliveries and failures"
    ).add_subparsers(dest="action", required=True)
    hooks.add_parser(
        "status", help="per URL: delivered, pending, failing, given up; the newest errors"
    ).set_defaults(run=status)
    hooks.add_parser(
        "retry", help="send every undelivered event again now (given up on ones too)"
    ).set_defaults(run=retry)
    hooks.add_parser(
        "off", help="stop writing events for every URL (after removing VTAI_WEBHOOK_URLS)"
    ).set_defaults(run=off)
