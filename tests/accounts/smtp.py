"""A real SMTP server for tests (aiosmtpd, plain SMTP, no STARTTLS) that keeps what it got."""

from __future__ import annotations

import asyncio
import email
import email.policy
import queue
import re
from email.message import EmailMessage

from aiosmtpd.controller import Controller

from tests.browser import free_port

LINK = re.compile(r"https?://\S+/reset/confirm\?token=\S+")


class _Keep:
    def __init__(self, inbox: queue.Queue):
        self.inbox = inbox

    async def handle_DATA(self, server, session, envelope):
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.inbox.put((list(envelope.rcpt_tos), msg))
        return "250 OK"


class Inbox:
    """The messages the server accepted, in order of arrival."""

    def __init__(self):
        self._queue: queue.Queue = queue.Queue()
        self._aside: list[tuple[list[str], EmailMessage]] = []
        self.port = free_port()
        self.controller = Controller(_Keep(self._queue), hostname="127.0.0.1", port=self.port)

    def start(self) -> Inbox:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    async def next(self, timeout: float = 15.0) -> tuple[list[str], EmailMessage]:
        """The next message, as soon as it arrives (queue.Empty after `timeout`)."""
        return await asyncio.to_thread(self._queue.get, True, timeout)

    async def to(self, rcpt: str, timeout: float = 15.0) -> EmailMessage:
        """The next message for `rcpt`; others that arrive first are kept for their tests."""
        for i, (rcpts, msg) in enumerate(self._aside):
            if rcpt in rcpts:
                del self._aside[i]
                return msg
        while True:
            rcpts, msg = await self.next(timeout)
            if rcpt in rcpts:
                return msg
            self._aside.append((rcpts, msg))

    def received_for(self, rcpt: str) -> bool:
        """Whether any message for `rcpt` has arrived (and not been taken by to())."""
        while not self._queue.empty():
            self._aside.append(self._queue.get_nowait())
        return any(rcpt in rcpts for rcpts, _ in self._aside)

    @staticmethod
    def link(msg: EmailMessage) -> str:
        found = LINK.search(msg.get_content())
        assert found, msg.get_content()
        return found.group(0)
