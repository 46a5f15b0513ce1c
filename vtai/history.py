"""Chat history: Chainlit's own data layer on VT.ai's database (VTAI_HISTORY=on|off).

The tables are defined by supabase/migrations/*_chat_history.sql; docs/history.md explains
what is kept and what deleting a chat does (and does not) change.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid

import asyncpg
from chainlit.data.chainlit_data_layer import ChainlitDataLayer
from chainlit.user import PersistedUser, User

from vtai.db import _pool_options
from vtai.ledger import sanitize
from vtai.settings import SettingsError, load_settings

# chat.py puts the quota line under every answer after this separator, in italics.
FOOTER = "\n\n---\n"
_QUOTA_FOOTER = re.compile(r"\n\n---\n\*[^\n]*tokens used[^\n]*\*\s*$")
# Notices chat.py appends in italics between the answer and the footer.
_ANSWER_NOTICES = ("The conversation outgrew", "The answer was cut short")
# Session keys that repeat what the steps already hold; Chainlit would copy them into every
# thread's metadata on disconnect.
_UNPERSISTED_SESSION_KEYS = ("history", "retry_text")
_MESSAGE_TYPES = ("user_message", "assistant_message")
# Messages chat.py answers itself, never the model.
_COMMANDS = ("/usage",)


def enabled() -> bool:
    """VTAI_HISTORY, on by default. A bad value counts as on: start-up reports it."""
    try:
        return load_settings().history
    except SettingsError:
        return True


def data_layer(services) -> VtaiDataLayer | None:
    if services is None or not services.settings.history:
        return None
    # REST-only metering has no database to keep chats in (Services.start logs it).
    if services.db is None or not services.db.url:
        return None
    return VtaiDataLayer(services.db.url)


class VtaiDataLayer(ChainlitDataLayer):
    """Chainlit's asyncpg data layer with VT.ai's ids and a right-sized pool.

    It keeps its own pool rather than sharing services.db.pool: that pool decodes json into
    Python objects, while Chainlit passes and expects json as text.
    """

    def __init__(self, database_url: str, pool_size: int = 5):
        super().__init__(database_url=database_url)
        self.pool_size = pool_size
        self._connecting = asyncio.Lock()

    async def connect(self):
        async with self._connecting:
            if not self.pool:
                # The base class opens ten connections per process up front.
                self.pool = await asyncpg.create_pool(
                    self.database_url,
                    min_size=1,
                    max_size=self.pool_size,
                    timeout=10,
                    command_timeout=30,
                    **_pool_options(self.database_url),
                )

    async def create_user(self, user: User) -> PersistedUser | None:
        """Persist the login's user under its VT.ai profile id, so RLS can use auth.uid()."""
        profile_id = (user.metadata or {}).get("id")
        if not profile_id:
            return await super().create_user(user)
        user_id = str(uuid.UUID(str(profile_id)))
        if not self.pool:
            await self.connect()
        async with self.pool.acquire() as conn, conn.transaction():
            # A username whose profile was deleted and re-created belongs to a new person:
            # move the old row aside instead of handing them its chats.
            await conn.execute(
                "update \"User\" set identifier = identifier || ' (replaced ' || id || ')',"
                ' "updatedAt" = now() where identifier = $1 and id <> $2',
                user.identifier,
                user_id,
            )
            row = await conn.fetchrow(
                'insert into "User" (id, identifier, metadata) values ($1, $2, $3)'
                " on conflict (id) do update set identifier = excluded.identifier,"
                ' metadata = excluded.metadata, "updatedAt" = now()'
                " returning *",
                user_id,
                user.identifier,
                json.dumps(user.metadata or {}),
            )
        return PersistedUser(
            id=str(row["id"]),
            identifier=str(row["identifier"]),
            createdAt=row["createdAt"].isoformat(),
            metadata=json.loads(row["metadata"]),
        )

    async def update_thread(
        self,
        thread_id: str,
        name: str | None = None,
        user_id: str | None = None,
        metadata: dict | None = None,
        tags: list[str] | None = None,
    ):
        if metadata:
            metadata = {k: v for k, v in metadata.items() if k not in _UNPERSISTED_SESSION_KEYS}
        await super().update_thread(
            thread_id, name=sanitize(name), user_id=user_id, metadata=metadata, tags=tags
        )

    async def create_step(self, step_dict):
        # Postgres text can't hold NUL; an unstorable character must not lose the message.
        step_dict = dict(step_dict)
        for key in ("input", "output", "name"):
            if isinstance(step_dict.get(key), str):
                step_dict[key] = sanitize(step_dict[key])
        await super().create_step(step_dict)

    async def close(self) -> None:
        # Chainlit closes the data layer after on_app_shutdown, when the embedded server may
        # already be gone; a graceful close could then wait on dead connections.
        if self.pool is not None:
            try:
                await asyncio.wait_for(self.pool.close(), timeout=5)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                self.pool.terminate()
            self.pool = None
        await super().close()


def _answer_text(content: str) -> str | None:
    """The model's words in an assistant message, or None if it is not a model answer.

    Only answers carry the quota footer; refusals, failures and notices don't, and the
    turn runner leaves those out of the model's history too.
    """
    if not _QUOTA_FOOTER.search(content):
        return None
    body = content[: content.rfind(FOOTER)]
    head, sep, last = body.rpartition("\n\n")
    if sep and last.startswith("*") and last.rstrip().endswith("*"):
        if last.strip("* \n").startswith(_ANSWER_NOTICES):
            body = head
    return body.strip()


def messages_from_thread(thread: dict) -> list[dict]:
    """The model's message history rebuilt from a stored thread's steps.

    Mirrors what the live chat keeps: a user message counts once a model answer follows it
    (a retried turn's answer pairs with the message that failed); refused or failed turns
    and commands such as /usage are left out.
    """
    # get_thread returns steps in the order they started.
    steps = [s for s in thread.get("steps") or [] if s.get("type") in _MESSAGE_TYPES]
    messages: list[dict] = []
    question: str | None = None
    for step in steps:
        text = step.get("output") or ""
        if not isinstance(text, str):
            continue
        if step["type"] == "user_message":
            if text.strip() and text.strip() not in _COMMANDS:
                question = text.strip()
            continue
        answer = _answer_text(text)
        if answer is None or question is None:
            continue
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": answer})
        question = None
    return messages
