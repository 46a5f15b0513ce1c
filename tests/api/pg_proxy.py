"""A TCP proxy to Postgres that a test can cut and restore, in a thread of its own.

The app under test connects through it, so a test can take "the database" away from the app
(every connection dropped, new ones refused, as when the server goes down) without stopping
the Postgres server every other test of the session shares.
"""

from __future__ import annotations

import asyncio
import threading
from urllib.parse import urlsplit, urlunsplit


class PgProxy:
    def __init__(self, url: str):
        parts = urlsplit(url)
        self._url = parts
        self._target = (parts.hostname, parts.port or 5432)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def url(self) -> str:
        """`url` with the proxy's address in place of the server's."""
        auth = self._url.netloc.rpartition("@")[0]
        netloc = f"{auth}@127.0.0.1:{self.port}" if auth else f"127.0.0.1:{self.port}"
        return urlunsplit(self._url._replace(netloc=netloc))

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def start(self) -> PgProxy:
        self._thread.start()
        self._run(self._listen())
        return self

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _link(self, reader, writer) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        self._links.update((writer, up_writer))

        async def pipe(src, dst) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._links.difference_update((writer, up_writer))

    def cut(self) -> None:
        """The database goes away: no new connections, and every open one is dropped."""

        async def cut() -> None:
            self._server.close()
            for w in list(self._links):
                w.transport.abort()

        self._run(cut())

    def restore(self) -> None:
        """The database is back, at the same address."""
        self._run(self._listen())

    def stop(self) -> None:
        try:
            self.cut()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
