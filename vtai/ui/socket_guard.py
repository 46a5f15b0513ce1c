"""What a chat client may send over socket.io, checked before Chainlit acts on it.

Chainlit trusts the browser: a `client_message` names its own step type, `edit_message` edits
any message in the chat (answers included) and runs outside Stop's reach, chat settings keep
any key a client sends, and a dropped socket leaves its turn running. The wrappers here keep
Chainlit's handlers and narrow what reaches them:

- a client message is always a user message (with a server-trusted id and time), and one over
  VTAI_MAX_MESSAGE_CHARS reaches Chainlit (and so the history tables) only as a placeholder
  carrying its size and hash;
- only the user's own messages can be edited, within the same size limit, and the answer to an
  edit is the session's current task, so Stop reaches it (vtai.ui.chat rewinds the context);
- chat settings keep only the model, by name; events without a payload are dropped;
- a turn whose client is gone for VTAI_DISCONNECT_GRACE seconds is cancelled, and so settled
  as a stop (vtai.metering.turn charges what the provider bills).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import uuid
from datetime import UTC, datetime

from vtai.metering.turn import oversize
from vtai.settings import Settings

log = logging.getLogger(__name__)

# Metadata keys the server sets on steps; a client's own are dropped.
SERVER_KEYS = ("vtai_call_id", "vtai_oversize")
# The chat settings a client may change (vtai.ui.chat offers these).
SETTINGS = ("model",)


def _accepts(handler, args: tuple) -> tuple:
    """`args` cut to what `handler` takes: python-socketio passes a disconnect's reason only to
    handlers that take it, and Chainlit's don't."""
    try:
        params = inspect.signature(handler).parameters.values()
    except (TypeError, ValueError):
        return args
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return args
    return args[: sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)]


def _wrap(sio, event: str, make) -> None:
    handlers = sio.handlers.setdefault("/", {})
    original = handlers.get(event)
    if original is None:
        raise RuntimeError(f"Chainlit has no {event!r} socket handler to guard")
    handlers[event] = make(original)


def placeholder(info: dict, limit: int) -> str:
    return (
        f"[A message of {info['chars']:,} characters, over the {limit:,}-character limit: "
        "not sent, not stored.]"
    )


def user_step(step: dict, limit: int) -> dict:
    """The step as a user message the client may send: typed by the server, size-checked,
    with the id and time Chainlit needs (a uuid4 it can trust, now)."""
    step = dict(step)
    step["type"] = "user_message"
    try:
        ok = uuid.UUID(str(step.get("id"))).version == 4
    except ValueError:
        ok = False
    if not ok:
        step["id"] = str(uuid.uuid4())
    if not isinstance(step.get("createdAt"), str):
        step["createdAt"] = datetime.now(UTC).isoformat()
    given = step.get("metadata")
    given = given if isinstance(given, dict) else {}
    metadata = {k: v for k, v in given.items() if k not in SERVER_KEYS}
    text = step.get("output")
    if not isinstance(text, str):
        text = ""
    if len(text) > limit:
        info = oversize(text)
        metadata["vtai_oversize"] = info
        text = placeholder(info, limit)
    step["output"] = text
    step["metadata"] = metadata
    return step


def _session(sid: str):
    from chainlit.session import WebsocketSession

    return WebsocketSession.get(sid)


def _own_message(session, message_id: str) -> bool:
    from chainlit.chat_context import chat_contexts

    for message in chat_contexts.get(session.id, []):
        if message.id == message_id:
            return message.type == "user_message"
    return False


def install(sio, settings: Settings) -> None:
    """Called once from vtai/main.py with Chainlit's socket.io server."""
    limit = settings.max_message_chars
    grace = settings.disconnect_grace

    def client_message(original):
        async def handler(sid, payload, *rest):
            if not isinstance(payload, dict) or not isinstance(payload.get("message"), dict):
                log.warning("client_message without a message refused (sid %s)", sid)
                return None
            payload = {**payload, "message": user_step(payload["message"], limit)}
            payload["fileReferences"] = []  # attachments are off (docs/security.md)
            return await original(sid, payload, *rest)

        return handler

    def edit_message(original):
        async def handler(sid, payload=None, *rest):
            message = payload.get("message") if isinstance(payload, dict) else None
            session = _session(sid)
            if not isinstance(message, dict) or session is None:
                return None
            if not _own_message(session, str(message.get("id"))):
                log.warning("edit of a message that is not the user's own refused (sid %s)", sid)
                return None
            text = message.get("output")
            if not isinstance(text, str) or len(text) > limit:
                log.warning("edit over the message size limit refused (sid %s)", sid)
                return None
            # Chainlit answers an edit inline, where Stop and the disconnect grace can't reach
            # it: as the session's current task, they can.
            task = asyncio.ensure_future(original(sid, payload, *rest))
            session.current_task = task
            return await task

        return handler

    def chat_settings_change(original):
        async def handler(sid, settings=None, *rest):
            # Chainlit keeps every key a client sends and stores them with the chat: only
            # the settings the chat offers (the model, by name) go through.
            if not isinstance(settings, dict):
                return None
            kept = {
                k: v
                for k, v in settings.items()
                if k in SETTINGS and isinstance(v, str) and len(v) <= 200
            }
            if not kept:
                return None
            return await original(sid, kept, *rest)

        return handler

    def needs_payload(original):
        async def handler(sid, data=None, *rest):
            if data is None:  # Chainlit's handler would raise on a bare event
                return None
            return await original(sid, data, *rest)

        return handler

    def disconnect(original):
        async def handler(sid, *rest):
            session = _session(sid)
            task = getattr(session, "current_task", None) if session else None
            try:
                return await original(*_accepts(original, (sid, *rest)))
            finally:
                if task is not None and not task.done():
                    asyncio.ensure_future(_cancel_if_gone(session, sid, task, grace))

        return handler

    _wrap(sio, "client_message", client_message)
    _wrap(sio, "edit_message", edit_message)
    _wrap(sio, "chat_settings_change", chat_settings_change)
    _wrap(sio, "window_message", needs_payload)
    _wrap(sio, "disconnect", disconnect)


async def _cancel_if_gone(session, sid: str, task: asyncio.Task, grace: float) -> None:
    """A brief network blip keeps the answer; a client gone for good stops paying for one."""
    if grace:
        await asyncio.sleep(grace)
    # A reconnect gives the same session a new socket id (Chainlit restores it).
    if session.socket_id == sid and not task.done():
        log.info("client of session %s gone for %ss: its turn is stopped", session.id, grace)
        task.cancel()
