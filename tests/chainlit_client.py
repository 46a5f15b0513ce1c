"""A chat client that speaks Chainlit's socket.io protocol, as the browser does (or an attacker).

It logs in over HTTP (`POST /login`), connects to `/ws/socket.io` with the cookie, and sends
`client_message` events; every event the server emits is kept, so a test can check what the
user would have seen. Nothing here calls VT.ai's code: it is a client of the real server.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx
import socketio


@dataclass
class Reply:
    """What the server sent for one user message: the new messages, in order."""

    messages: list[dict] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The last message's text (the answer, or the refusal)."""
        return self.messages[-1]["output"] if self.messages else ""

    @property
    def answer(self) -> dict | None:
        for m in reversed(self.messages):
            if m.get("type") == "assistant_message":
                return m
        return None


async def login(base: str, username: str, password: str) -> str:
    """The `access_token` cookie of a password login, or an AssertionError."""
    async with httpx.AsyncClient(base_url=base) as http:
        r = await http.post("/login", data={"username": username, "password": password})
        assert r.status_code == 200, f"login failed: {r.status_code} {r.text[:200]}"
        token = http.cookies.get("access_token")
        assert token, "no access_token cookie after login"
        return token


class ChatClient:
    def __init__(self, base: str, token: str, origin: str | None = None):
        self.base = base
        self.token = token
        self.origin = origin
        self.session_id = str(uuid.uuid4())
        self.sio = socketio.AsyncClient(reconnection=False)
        self.events: list[tuple[str, object]] = []
        self._changed = asyncio.Event()
        self.sio.on("*", self._on_any)

    async def _on_any(self, event: str, data=None):
        self.events.append((event, data))
        self._changed.set()

    @property
    def thread_id(self) -> str | None:
        for event, data in self.events:
            if event == "first_interaction" and isinstance(data, dict):
                return data.get("thread_id")
        for event, data in self.events:
            if event in ("new_message", "stream_start") and isinstance(data, dict):
                if data.get("threadId"):
                    return data["threadId"]
        return None

    async def connect(self, thread_id: str | None = None, wait_started: bool = True) -> None:
        headers = {"Cookie": f"access_token={self.token}"}
        if self.origin:
            headers["Origin"] = self.origin
        await self.sio.connect(
            self.base,
            socketio_path="/ws/socket.io",
            transports=["websocket"],
            headers=headers,
            auth={
                "clientType": "webapp",
                "sessionId": self.session_id,
                "threadId": thread_id or "",
                "userEnv": "{}",
                "chatProfile": "",
            },
            wait_timeout=10,
        )
        await self.sio.emit("connection_successful")
        if wait_started:
            # on_chat_start (or resume) has run once the chat settings arrive.
            await self.wait_for(lambda: self.seen("chat_settings") or self.seen("resume_thread"))

    def seen(self, name: str) -> bool:
        return any(event == name for event, _ in self.events)

    async def wait_for(self, condition, timeout: float = 60.0) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                self._changed.clear()
                if condition():
                    return
                await self._changed.wait()

    def _message(self, text: str, kind: str) -> dict:
        return {
            "message": {
                "id": str(uuid.uuid4()),
                "threadId": self.thread_id or "",
                "name": "user",
                "type": kind,
                "output": text,
                "createdAt": datetime.now(UTC).isoformat(),
                "metadata": {},
            },
            "fileReferences": [],
        }

    async def send_raw(self, text: str, kind: str = "user_message") -> int:
        """Emit a client_message; returns the event index it was sent at."""
        mark = len(self.events)
        await self.sio.emit("client_message", self._message(text, kind))
        return mark

    async def collect(self, mark: int, timeout: float = 120.0) -> Reply:
        """What the server sent after `mark` until its task ended."""

        def ended() -> bool:
            names = [e for e, _ in self.events[mark:]]
            return "task_start" in names and "task_end" in names[names.index("task_start") :]

        await self.wait_for(ended, timeout)
        return self.reply_since(mark)

    def reply_since(self, mark: int) -> Reply:
        reply = Reply()
        for event, data in self.events[mark:]:
            if event == "new_message" and isinstance(data, dict):
                reply.messages.append(data)
            elif event == "stream_token" and isinstance(data, dict):
                reply.tokens.append(data.get("token", ""))
        return reply

    async def send(self, text: str, kind: str = "user_message", timeout: float = 120.0) -> Reply:
        """Send a message and wait until the server's task for it has ended."""
        return await self.collect(await self.send_raw(text, kind), timeout)

    def actions_since(self, mark: int) -> list[dict]:
        """The action buttons the server attached to messages after `mark`."""
        return [d for e, d in self.events[mark:] if e == "action" and isinstance(d, dict)]

    async def call_action(self, action: dict) -> int:
        """Click an action button: `POST /project/action`, as the browser does. Chainlit runs
        the callback before it answers; returns the event index before the click (what the
        callback sent arrives over the socket, so wait for it from there)."""
        mark = len(self.events)
        headers = {"Cookie": f"access_token={self.token}"}
        if self.origin:
            headers["Origin"] = self.origin
        async with httpx.AsyncClient(base_url=self.base, timeout=120) as http:
            r = await http.post(
                "/project/action",
                json={"sessionId": self.session_id, "action": action},
                headers=headers,
            )
        assert r.status_code == 200, f"action failed: {r.status_code} {r.text[:200]}"
        return mark

    async def change_settings(self, **values) -> None:
        await self.sio.emit("chat_settings_change", values)

    async def stop(self) -> None:
        await self.sio.emit("stop")

    async def call(self, event: str, *args) -> None:
        await self.sio.emit(event, args[0] if len(args) == 1 else list(args) or None)

    async def close(self) -> None:
        if self.sio.connected:
            await self.sio.disconnect()

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


async def chat(
    base: str, username: str, password: str, thread_id: str | None = None, **kw
) -> ChatClient:
    """Log in and open a chat; close it with `await client.close()` (or `async with`)."""
    client = ChatClient(base, await login(base, username, password), **kw)
    await client.connect(thread_id)
    return client


def dumps(obj) -> str:
    return json.dumps(obj, default=str)
