"""One app process's burst of concurrent turns, for the multi-process tests.

Usage: python -m tests.burst DB_URL USER_ID TURNS DATA_DIR
Prints one JSON line: how many turns were answered, refused and failed.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from pathlib import Path

from tests.conftest import make_settings, offering
from tests.fake_provider import FakeProvider
from vtai.metering.turn import TurnRequest, TurnRunner
from vtai.services import Services


async def burst(db_url: str, user_id: uuid.UUID, turns: int, data_dir: Path) -> dict:
    provider = FakeProvider().start()
    services = await Services.start(make_settings(db_url, data_dir), replay=False)
    try:
        runner = TurnRunner(
            services.gate,
            services.ledger,
            services.callback.notes,
            offering(services.settings, "openai/fake"),
            call_options={"api_base": provider.url("ok"), "api_key": "sk-test"},
        )

        async def one(i: int) -> str:
            req = TurnRequest(user_id, f"chat-{i}", "openai/fake", [], f"question {i}")
            return (await runner.run(req, _ignore)).kind

        kinds = await asyncio.gather(*(one(i) for i in range(turns)))
        await runner.drain()
        return {k: kinds.count(k) for k in set(kinds)}
    finally:
        await services.stop()
        provider.stop()


async def _ignore(_token: str) -> None:
    return None


if __name__ == "__main__":
    url, user, n, data = sys.argv[1], uuid.UUID(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    print(json.dumps(asyncio.run(burst(url, user, n, data))))
