"""Chat history: Chainlit's own data layer on VT.ai's database (VTAI_HISTORY=on|off).

The tables are defined by supabase/migrations/*_chat_history.sql; docs/history.md explains
what is kept and what deleting a chat does (and does not) change.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import uuid
from collections.abc import Collection, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import asyncpg
from chainlit.data.chainlit_data_layer import ChainlitDataLayer
from chainlit.data.utils import queue_until_user_message
from chainlit.types import Feedback
from chainlit.user import PersistedUser, User

from vtai.db.connection import _pool_options
from vtai.metering.encoding import sanitize
from vtai.settings import Settings, SettingsError, load_settings

log = logging.getLogger(__name__)

# chat.py puts the quota line under every answer after this separator, in italics.
FOOTER = "\n\n---\n"
_QUOTA_FOOTER = re.compile(r"\n\n---\n\*[^\n]*tokens used[^\n]*\*\s*$")
# Notices chat.py appends in italics between the answer and the footer.
_ANSWER_NOTICES = ("The conversation outgrew", "The answer was cut short")
# Session keys that repeat what the steps already hold; Chainlit would copy them into every
# thread's metadata on disconnect.
_UNPERSISTED_SESSION_KEYS = ("history", "retry_text", "retry_id", "asked")
_MESSAGE_TYPES = ("user_message", "assistant_message")
# Messages chat.py answers itself, never the model.
_COMMANDS = ("/usage",)

# chat.py marks every message the server makes from a model call with that call's LiteLLM id;
# only such answers, matched to the thread's own request_logs rows, are model context again.
CALL_ID = "vtai_call_id"
# Thread metadata: call ids whose answer step was deleted (a user edit removes the answers
# after the edited message), so that no later step can claim them.
RETIRED_CALLS = "vtai_retired_calls"
# Stored answers are the server's, bounded by the model's output; this only stops a forged one.
ANSWER_CHARS_FACTOR = 16
NAME_CHARS = 255
METADATA_CHARS = 16_384


def refused_text(length: int, limit: int) -> str:
    """What is stored instead of a message over the limit."""
    return f"[message of {length:,} characters refused: over the {limit:,} limit]"


@dataclass(frozen=True)
class Actor:
    """Who is asking the data layer for a feedback write: the signed-in user of the request."""

    identifier: str
    user_id: str | None = None  # "User".id, which is the VT.ai profile id


# Set per request by vtai.ui.feedback_guard (the data layer is not told who the user is).
acting_user: ContextVar[Actor | None] = ContextVar("vtai_acting_user", default=None)


@contextlib.contextmanager
def acting_as(actor: Actor | None) -> Iterator[None]:
    token = acting_user.set(actor)
    try:
        yield
    finally:
        acting_user.reset(token)


class FeedbackRefused(Exception):
    """A feedback write the user may not make; str() is the one line the client sees."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


NO_SUCH_MESSAGE = "No such answer in your chats."


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
    return VtaiDataLayer(services.db.url, settings=services.settings)


class VtaiDataLayer(ChainlitDataLayer):
    """Chainlit's asyncpg data layer with VT.ai's ids and a right-sized pool.

    It keeps its own pool rather than sharing services.db.pool: that pool decodes json into
    Python objects, while Chainlit passes and expects json as text.
    """

    def __init__(self, database_url: str, pool_size: int = 5, settings: Settings | None = None):
        super().__init__(database_url=database_url)
        self.pool_size = pool_size
        self._connecting = asyncio.Lock()
        if settings is None:
            try:
                settings = load_settings()
            except SettingsError:
                settings = None
        # VTAI_MAX_MESSAGE_CHARS: the socket guard refuses longer messages; this stores none.
        self.max_message_chars = settings.max_message_chars if settings else 32_000

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
            # The retired call ids are written by delete_step alone, never from a session.
            metadata = {
                k: v
                for k, v in metadata.items()
                if k not in _UNPERSISTED_SESSION_KEYS and k != RETIRED_CALLS
            }
        await super().update_thread(
            thread_id, name=sanitize(name), user_id=user_id, metadata=metadata, tags=tags
        )

    def _bounded(self, step_dict: dict) -> dict:
        """The step as it may be stored: storable characters, and no text over the limits."""
        step_dict = dict(step_dict)
        limit = self.max_message_chars
        if step_dict.get("type") == "assistant_message":
            limit *= ANSWER_CHARS_FACTOR
        for key in ("input", "output", "name"):
            value = step_dict.get(key)
            if not isinstance(value, str):
                continue
            if key == "name":
                value = value[:NAME_CHARS]
            elif len(value) > limit:
                log.warning(
                    "step %s: %s of %d characters not stored", step_dict.get("id"), key, len(value)
                )
                value = refused_text(len(value), limit)
            # Postgres text can't hold NUL; an unstorable character must not lose the message.
            step_dict[key] = sanitize(value)
        metadata = step_dict.get("metadata")
        if not isinstance(metadata, dict):
            metadata = {}
        if len(json.dumps(metadata, default=str)) > METADATA_CHARS:
            metadata = {k: v for k, v in metadata.items() if k == CALL_ID and isinstance(v, str)}
        step_dict["metadata"] = sanitize(metadata)
        return step_dict

    @queue_until_user_message()
    async def create_step(self, step_dict):
        """Chainlit's upsert, except that nothing changes a stored answer or moves a step.

        Chainlit writes a client's message with the id and type the client sent, and an
        edit with update_step; both land here. A step id that is already stored keeps its
        thread and its type (a 'run' placeholder with no text excepted), a stored
        assistant_message keeps its text and its call id, and only an assistant_message
        may carry a call id that no other step of its thread has (or had).
        """
        step_dict = self._bounded(step_dict)
        if not self.pool:
            await self.connect()
        stored = await self.pool.fetchrow(
            'select "threadId", type, output, metadata::jsonb ->> $2 as call_id'
            ' from "Step" where id = $1',
            step_dict["id"],
            CALL_ID,
        )
        metadata = step_dict["metadata"]
        kind = step_dict.get("type")
        if stored is None:
            call_id = metadata.get(CALL_ID)
            if call_id is not None and (
                kind != "assistant_message"
                or not isinstance(call_id, str)
                or await self._call_id_taken(step_dict.get("threadId"), call_id)
            ):
                log.warning("step %s: call id marker dropped", step_dict["id"])
                metadata.pop(CALL_ID)
        else:
            refusal = _refuse_change(stored, step_dict)
            if refusal:
                log.warning("step %s not changed: %s", step_dict["id"], refusal)
                return
            if stored["call_id"] is not None:
                metadata[CALL_ID] = stored["call_id"]
            elif metadata.pop(CALL_ID, None) is not None:
                log.warning("step %s: call id marker dropped", step_dict["id"])
        await super().create_step(step_dict)

    async def _call_id_taken(self, thread_id: str | None, call_id: str) -> bool:
        if not thread_id:
            return True
        return bool(
            await self.pool.fetchval(
                'select exists (select 1 from "Step" where "threadId" = $1'
                " and metadata::jsonb ->> $3 = $2)"
                ' or exists (select 1 from "Thread" where id = $1'
                " and coalesce(metadata::jsonb -> $4, '[]'::jsonb) ? $2)",
                thread_id,
                call_id,
                CALL_ID,
                RETIRED_CALLS,
            )
        )

    @queue_until_user_message()
    async def delete_step(self, step_id: str):
        """Chainlit's delete (elements, ratings, the step), retiring an answer's call id."""
        if not self.pool:
            await self.connect()
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute('delete from "Element" where "stepId" = $1', step_id)
            await conn.execute('delete from "Feedback" where "stepId" = $1', step_id)
            await conn.execute(
                'with gone as (delete from "Step" where id = $1'
                ' returning "threadId", metadata::jsonb ->> $2 as call_id)'
                ' update "Thread" t set metadata = jsonb_set(t.metadata::jsonb, array[$3],'
                " coalesce(t.metadata::jsonb -> $3, '[]'::jsonb) || to_jsonb(gone.call_id))"
                ' from gone where t.id = gone."threadId" and gone.call_id is not null',
                step_id,
                CALL_ID,
                RETIRED_CALLS,
            )

    # --- feedback: only on the signed-in user's own answers --------------------------------

    async def check_feedback(
        self, actor: Actor | None, step_id: str | None = None, feedback_id: str | None = None
    ) -> None:
        """Raise FeedbackRefused unless `actor` may rate step_id / change feedback_id."""
        if actor is None:
            raise FeedbackRefused(401, "Sign in to rate answers.")
        if not self.pool:
            await self.connect()
        if feedback_id is not None:
            rated = await self.pool.fetchval(
                'select "stepId" from "Feedback" where id = $1', str(feedback_id)
            )
            if step_id is None:
                if rated is None:
                    raise FeedbackRefused(404, "No such rating in your chats.")
                step_id = rated
            elif rated is not None and rated != step_id:
                raise FeedbackRefused(404, "No such rating in your chats.")
        owner = await self.pool.fetchrow(
            'select s.type, t."userId", u.identifier from "Step" s'
            ' join "Thread" t on t.id = s."threadId" and t."deletedAt" is null'
            ' join "User" u on u.id = t."userId" where s.id = $1',
            str(step_id),
        )
        # The chat UI rates the run step that holds an answer; the API may rate the answer.
        if owner is None or owner["type"] not in ("assistant_message", "run"):
            raise FeedbackRefused(404, NO_SUCH_MESSAGE)
        mine = (
            owner["userId"] == actor.user_id
            if actor.user_id
            else owner["identifier"] == actor.identifier
        )
        if not mine:
            # The same answer as a missing step: nothing confirms that someone else's exists.
            raise FeedbackRefused(404, NO_SUCH_MESSAGE)

    async def upsert_feedback(self, feedback: Feedback) -> str:
        await self.check_feedback(
            acting_user.get(), step_id=feedback.forId, feedback_id=feedback.id
        )
        if feedback.value not in (0, 1):
            raise FeedbackRefused(400, "A rating is 0 or 1.")
        comment = feedback.comment
        if isinstance(comment, str):
            if len(comment) > self.max_message_chars:
                comment = refused_text(len(comment), self.max_message_chars)
            comment = sanitize(comment)
        elif comment is not None:
            raise FeedbackRefused(400, "A comment is text.")
        try:
            return await super().upsert_feedback(
                Feedback(
                    forId=feedback.forId, value=feedback.value, id=feedback.id, comment=comment
                )
            )
        except asyncpg.ForeignKeyViolationError:
            # The answer was deleted after the check.
            raise FeedbackRefused(404, NO_SUCH_MESSAGE) from None

    async def delete_feedback(self, feedback_id: str) -> bool:
        await self.check_feedback(acting_user.get(), feedback_id=feedback_id)
        return await super().delete_feedback(feedback_id)

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


def _refuse_change(stored, step_dict: dict) -> str | None:
    """Why an upsert of an already stored step must not be applied, or None."""
    thread_id = step_dict.get("threadId")
    if thread_id and stored["threadId"] and thread_id != stored["threadId"]:
        return "it belongs to another thread"
    kind = step_dict.get("type")
    if kind != stored["type"] and kind != "run":
        if not (stored["type"] == "run" and not stored["output"]):
            return f"a {stored['type']} does not become a {kind}"
    if stored["type"] == "assistant_message":
        output = step_dict.get("output")
        if output and output != stored["output"]:
            return "a stored answer is not edited"
        if step_dict["metadata"].get(CALL_ID, stored["call_id"]) != stored["call_id"]:
            return "a stored answer keeps its call id"
    return None


async def produced_call_ids(pool, thread_id: str, user_id: uuid.UUID | str) -> set[str]:
    """The LiteLLM call ids the ledger holds for this chat and user: answers the server made.

    Rows still in the spool (database down when the turn ended) are not there yet, so their
    answers are left out of a chat resumed before the spool is replayed.
    """
    rows = await pool.fetch(
        "select litellm_call_id from public.request_logs"
        " where session_id = $1 and end_user = $2 and litellm_call_id is not null",
        str(thread_id),
        uuid.UUID(str(user_id)),
    )
    return {r["litellm_call_id"] for r in rows}


def _metadata(step: dict) -> dict:
    metadata = step.get("metadata")
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except ValueError:
            return {}
    return metadata if isinstance(metadata, dict) else {}


def messages_from_thread(thread: dict, produced: Collection[str] = ()) -> list[dict]:
    """The model's message history rebuilt from a stored thread's steps.

    Mirrors what the live chat keeps: a user message counts once a model answer follows it
    (a retried turn's answer pairs with the message that failed); refused or failed turns
    and commands such as /usage are left out.

    Only answers the server made are model context: an assistant step counts if its
    metadata's call id is in `produced` (produced_call_ids: the chat's own ledger rows),
    is not retired (its first step was deleted), and is the first step with that id. Any
    other assistant step (one a client forged, or one stored before answers were marked)
    is shown in the chat but never sent to the model.
    """
    retired = _metadata(thread).get(RETIRED_CALLS) or []
    usable = set(produced) - {c for c in retired if isinstance(c, str)}
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
        call_id = _metadata(step).get(CALL_ID)
        if not isinstance(call_id, str) or call_id not in usable:
            continue
        usable.discard(call_id)  # a copy of the marker on a later step is not an answer
        answer = _answer_text(text)
        if answer is None or question is None:
            continue
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": answer})
        question = None
    return messages
