"""The Chainlit side of VT.ai: what each handler in main.py does.

Per-chat state lives in cl.user_session; process-wide services are built at app start-up.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import chainlit as cl
from chainlit.input_widget import Select

from vtai.admin import balances
from vtai.db import accounts
from vtai.llm import models
from vtai.metering.turn import TurnRequest
from vtai.services import Services
from vtai.settings import load_settings
from vtai.ui import history, quota

log = logging.getLogger(__name__)

_services: Services | None = None
_balance_sync: asyncio.Task | None = None

USAGE_COMMAND = {
    "id": "Usage",
    "icon": "gauge",
    "description": "Show my token quota for this period",
    "button": True,
    "persistent": True,
}


def services() -> Services:
    if _services is None:
        raise RuntimeError("VT.ai services are not started")
    return _services


async def startup() -> None:
    global _services, _balance_sync
    if _services is None:
        _services = await Services.start(load_settings())
        if _services.db is not None:
            _balance_sync = balances.start_periodic(_services.db.pool)
        await _first_account_hint(_services)
        if _services.settings.model == models.LOCAL_MODEL_ID:
            # Load the model now rather than on the first user's first message.
            from vtai.llm import local_model

            await asyncio.to_thread(local_model.server)


async def _first_account_hint(s: Services) -> None:
    """`make run` makes the first admin; a plain `chainlit run` says how to make one."""
    if s.db is None or s.settings.supabase_auth:
        return
    async with s.db.pool.acquire() as conn:
        if await accounts.any_admin(conn):
            return
    name = s.settings.admin_username
    print(
        "VT.ai has no account yet. Create the first admin, then log in:\n"
        f"  echo 'A-STRONG-PASSWORD' | vtai user add {name} --admin --tier unlimited "
        "--password-stdin\n(`make run` creates one for you and prints its password.)",
        flush=True,
    )


async def shutdown() -> None:
    global _services, _balance_sync
    await balances.stop_periodic(_balance_sync)
    _balance_sync = None
    if _services is not None:
        await _services.stop()
        _services = None


async def login(username: str, password: str) -> cl.User | None:
    # Throttled check, then a server-side session whose id rides in the cookie.
    from vtai.web import sessions

    return await sessions.login(username, password)


def _user_id() -> uuid.UUID:
    user = cl.user_session.get("user")
    return uuid.UUID(user.metadata["id"])


async def _quota_line() -> str:
    usage = await services().gate.usage(_user_id())
    if usage is None:
        return "Your account no longer exists: sign in again or ask the administrator."
    return quota.describe(usage.tier, usage.used, usage.token_limit, usage.resets_at)


# How long the quota line waits for the turn's row to be settled before it says nothing.
SETTLE_WAIT = 10.0


async def _settled_quota_line(outcome) -> str | None:
    """The quota line under an answer: what the ledger holds once this turn's row is settled,
    read after the last token (never before it). None if the row or the read takes too long."""
    if outcome.settled is None or not (outcome.grant and outcome.grant.tier):
        return None
    try:
        await asyncio.wait_for(asyncio.shield(outcome.settled), SETTLE_WAIT)
        usage = await services().gate.usage(_user_id())
    except Exception as exc:
        # Late, spooled or unreadable: no line rather than a wrong one.
        log.warning("quota line skipped (%s)", type(exc).__name__)
        return None
    if usage is None:
        return None
    return quota.describe(usage.tier, usage.used, usage.token_limit, usage.resets_at)


async def start(past: list[dict] | None = None, model: str | None = None) -> None:
    s = services()
    await s.runner.refresh_models()
    offered = s.runner.offered()
    # A resumed chat whose model is no longer offered continues on the default.
    chosen = offered.index(model) if model in offered else 0
    cl.user_session.set("history", past or [])
    cl.user_session.set("asked", [])
    cl.user_session.set("model", offered[chosen])
    # The first message's reservation is made while the user types it.
    await end()  # a session that switches chats gives the old one's reservation back
    holder = s.runner.next_turn()
    cl.user_session.set("next_turn", holder)
    s.runner.reserve_ahead(holder, _user_id(), offered[chosen], past or [])
    await cl.ChatSettings(
        [
            Select(
                id="model",
                label="Model",
                items=s.runner.labels(offered),
                initial_value=offered[chosen],
            )
        ]
    ).send()
    # A button by the message box: the quota is always one click away.
    await cl.context.emitter.set_commands([USAGE_COMMAND])


async def resume(thread: dict) -> None:
    """Continue a stored chat with the model seeing what was said before, on its model."""
    # The chat's last metered turn says which model it used (indexed by session_id).
    db = services().db
    model = None
    produced: set[str] = set()
    if db is not None:
        model = await db.pool.fetchval(
            "select model from public.request_logs where session_id = $1 and end_user = $2"
            " order by created_at desc limit 1",
            thread["id"],
            _user_id(),
        )
        # Only answers the server made are fed back to the model, never a forged step.
        produced = await history.produced_call_ids(db.pool, thread["id"], _user_id())
    await start(history.messages_from_thread(thread, produced), model)


async def end() -> None:
    holder = cl.user_session.get("next_turn")
    if holder is not None:
        await holder.release()


async def settings_update(values: dict) -> None:
    model = values.get("model")
    if model is None:
        return
    await services().runner.refresh_models()
    if model not in services().runner.offered():
        # Whatever the client sends, only an offered model is ever called (vtai.metering.turn checks
        # again); the picker keeps the chat's current one.
        current = cl.user_session.get("model") or services().settings.model
        log.warning("settings update with a model not offered refused: %r", str(model)[:100])
        await cl.Message(
            content=f"That model is not offered here, so this chat stays on {current}."
        ).send()
        return
    cl.user_session.set("model", model)


async def show_usage() -> None:
    try:
        usage = await services().gate.usage(_user_id())
        days = await services().gate.daily(_user_id(), usage.period_start) if usage else []
    except Exception as exc:
        # The database or the REST API is down: a line for the user, not a traceback.
        log.warning("usage lookup failed (%s)", type(exc).__name__)
        await cl.Message(content="The usage service is unavailable: try again shortly.").send()
        return
    if usage is None:
        await cl.Message(content=await _quota_line()).send()
        return
    line = quota.describe(usage.tier, usage.used, usage.token_limit, usage.resets_at)
    chart = quota.daily_chart(days[-31:])
    await cl.Message(
        content=f"**Usage this {services().settings.usage_period}**\n\n{line}\n\n"
        f"```text\n{chart}\n```"
    ).send()


def _attachment_notice(message: cl.Message) -> str | None:
    names = [e.name for e in (message.elements or [])]
    if not names:
        return None
    return (
        f"Attachments are not read by the model yet, so {', '.join(names)} "
        "was not sent: paste the text into your message instead."
    )


async def message(message: cl.Message) -> None:
    text = message.content or ""
    if text.strip() == "/usage" or message.command == USAGE_COMMAND["id"]:
        await show_usage()
        return
    notice = _attachment_notice(message)
    if notice:
        await cl.Message(content=notice).send()
        if not text.strip():
            return
    _rewind_to(message.id)
    await run_turn(text, (message.metadata or {}).get("vtai_oversize"), message.id)


def _rewind_to(message_id: str) -> None:
    """An edited message is answered again: the model's context (and what the user pays for)
    goes back to before it, as the chat on the screen does. `asked` holds the id of the user
    message behind each exchange in `history`, newest last; history may have lost its oldest
    exchanges to trimming, or hold a resumed chat's without ids, so the two align at the end."""
    asked: list[str] = cl.user_session.get("asked") or []
    if message_id not in asked:
        return
    drop = len(asked) - asked.index(message_id)
    history = cl.user_session.get("history") or []
    cl.user_session.set("history", history[: max(len(history) - 2 * drop, 0)])
    cl.user_session.set("asked", asked[: len(asked) - drop])


async def run_turn(text: str, oversize: dict | None = None, message_id: str | None = None) -> None:
    s = services()
    reply = cl.Message(content="")
    outcome = await s.runner.run(
        TurnRequest(
            user_id=_user_id(),
            session_id=cl.context.session.thread_id,
            model=cl.user_session.get("model") or s.settings.model,
            history=cl.user_session.get("history") or [],
            text=text,
            next_turn=cl.user_session.get("next_turn"),
            oversize=oversize,
        ),
        on_token=reply.stream_token,
    )
    # Marks the answer as the server's: a resumed chat feeds the model only these (history).
    if outcome.call_id:
        reply.metadata = {"vtai_call_id": outcome.call_id}
    cl.user_session.set("history", outcome.history)
    if outcome.kind == "answered" and message_id:
        cl.user_session.set("asked", [*(cl.user_session.get("asked") or []), message_id])
    if outcome.kind == "answered":
        if outcome.notice:
            reply.content = f"{reply.content}\n\n*{outcome.notice}*"
        line = await _settled_quota_line(outcome)
        if line:
            reply.content = f"{reply.content}\n\n---\n*{line}*"
        await reply.send()
        return
    if outcome.kind == "failed":
        cl.user_session.set("retry_text", text)
        cl.user_session.set("retry_id", message_id)
        body = f"{outcome.reply}\n\n---\n{outcome.notice}" if outcome.reply else outcome.notice
        reply.content = body
        reply.actions = [cl.Action(name="retry", payload={}, label="Retry")]
        await reply.send()
        return
    reply.content = outcome.notice or ""
    await reply.send()


async def retry(action: cl.Action) -> None:
    text = cl.user_session.get("retry_text")
    await action.remove()
    if text:
        await run_turn(text, message_id=cl.user_session.get("retry_id"))
