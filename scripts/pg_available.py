"""Exit 0 when the Postgres URL given as the argument accepts a connection within 3 s."""

import asyncio
import sys

import asyncpg


async def main(url: str) -> int:
    try:
        conn = await asyncpg.connect(url, timeout=3)
    except Exception:
        return 1
    await conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1])))
