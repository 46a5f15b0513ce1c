"""One webhook delivery process, as an app process runs it (vtai.notify.delivery.Deliverer
over a pool), for tests that need several real OS processes or one that dies:
`python -m tests.notify.deliver_worker DB_URL SECRET LEASE URL...`. Runs until killed."""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

import asyncpg

from vtai.notify import outbox
from vtai.notify.delivery import Deliverer
from vtai.notify.local import LocalQueue


async def main(db_url: str, secret: str, lease: float, urls: tuple[str, ...]) -> None:
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=4)
    queue = LocalQueue(Path(tempfile.mkdtemp(prefix="vtai-worker-")))
    deliverer = Deliverer(
        outbox.PoolCalls(pool), urls, secret, queue, lease=lease, poll=0.05, backoff=0.2
    ).start()
    print("ready", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await deliverer.stop()
        await pool.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), tuple(sys.argv[4:])))
