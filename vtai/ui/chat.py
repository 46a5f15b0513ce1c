"""The Chainlit side of VT.ai: what each handler in main.py does.

Per-chat state lives in cl.user_session; process-wide services are built at app start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

import chainlit as cl
from chainlit.input_widget import Select

from vtai.admin import balances
from vtai.billing import checkout, grace
from vtai.db import accounts
from vtai.llm import models, patterns
from vtai.metering.gate import QUOTA_REASONS
from vtai.metering.turn import TurnRequest
from vtai.notify import delivery as webhooks
from vtai.notify import notices
from vtai.services import Services
from vtai.settings import load_settings
from vtai.ui import history, quota

log = logging.getLogger(__name__)

_services: Services | None = None
_balance_sync: asyncio.Task | None = None
_grace_sweep: asyncio.Task | None = None
_retention: asyncio.Task | None = None

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
    global _services, _balance_sync, _grace_sweep, _retention
    if _services is None:
        _services = await Services.start(load_settings())
        if _services.db is not None:
            _balance_sync = balances.start_periodic(_services.db.pool)
        if _services.settings.billing:
            # Subscribers whose failed payment's grace period ran out go to free: no Stripe
            # event says so. Idempotent SQL, so every process may run it.
            _grace_sweep = asyncio.create_task(grace.sweep_forever(_services, _services.settings))
        if _services.settings.content_retention_days is not None:
            from vtai.retention import schedule as retention

            # Hourly; an advisory lock lets one process purge at a time.
            _retention = asyncio.create_task(retention.purge_forever(_services, _services.settings))
        # Operator webhooks' delivery loop (off, in one line, without VTAI_WEBHOOK_URLS).
        await webhooks.start(_services)
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
    global _services, _balance_sync, _grace_sweep, _retention
    await balances.stop_periodic(_balance_sync)
    _balance_sync = None
    if _grace_sweep is not None:
        _grace_sweep.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await _grace_sweep
        _grace_sweep = None
    if _retention is not None:
        _retention.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await _retention
        _retention = None
    await webhooks.stop(webhooks.current)
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
    return quota.describe_usage(usage, outcome.grant.weight)


async def _plan_models() -> list[str]:
    """The models the picker lists: those offered here that the user's plan includes. Only
    what to show: vtai_reserve refuses any other model whatever the client sends."""
    s = services()
    await s.runner.refresh_models()
    offered = s.runner.offered()
    try:
        usage = await s.gate.usage(_user_id())
    except Exception as exc:
        log.warning("plan lookup failed (%s); the picker lists every model", type(exc).__name__)
        return offered
    if usage is None:
        return offered
    return patterns.allowed(usage.models, offered)


async def _send_picker(allowed: list[str], chosen: str) -> None:
    await cl.ChatSettings(
        [
            Select(
                id="model",
                label="Model",
                items=services().runner.labels(allowed),
                initial_value=chosen,
            )
        ]
    ).send()


async def start(past: list[dict] | None = None, model: str | None = None) -> None:
    s = services()
    allowed = await _plan_models()
    if not allowed:
        await cl.Message(
            content="Your plan includes none of the models this server offers: ask the "
            "administrator to add one to your tier (vtai tier set TIER --models ...)."
        ).send()
        allowed = s.runner.offered()
    # A resumed chat whose model is no longer offered, or not in the plan, goes on the default.
    chosen = model if model in allowed else allowed[0]
    if model is not None and model != chosen:
        await cl.Message(
            content=f"This chat used {model}, which is not available to you now: it goes on "
            f"with {chosen}."
        ).send()
    cl.user_session.set("history", past or [])
    cl.user_session.set("asked", [])
    cl.user_session.set("model", chosen)
    # The first message's reservation is made while the user types it.
    await end()  # a session that switches chats gives the old one's reservation back
    holder = s.runner.next_turn()
    cl.user_session.set("next_turn", holder)
    s.runner.reserve_ahead(holder, _user_id(), chosen, past or [])
    await _send_picker(allowed, chosen)
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
    if model not in await _plan_models():
        # Whatever the client sends, only an offered model is ever called (vtai.metering.turn
        # checks again, and vtai_reserve checks the plan); the chat keeps its current one.
        current = cl.user_session.get("model") or services().settings.model
        log.warning("settings update with a model not offered refused: %r", str(model)[:100])
        await cl.Message(
            content=f"That model is not offered on your plan, so this chat stays on {current}."
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
    entry = services().runner.catalogue
    model = cl.user_session.get("model")
    weight = entry.get(model).weight if entry is not None and entry.get(model) else None
    line = quota.describe_usage(usage, weight)
    chart = quota.daily_chart(days[-31:])
    # The same quota from scripts: keys are made on /account (it needs the database URL).
    keys = "\n\nUse it from code: API keys on [/account](/account)." if services().db else ""
    actions = await _billing_actions()
    more = f"\n\n{UPGRADE_HINT}" if _offers_plans(actions) else ""
    await cl.Message(
        content=f"**Usage this {services().settings.usage_period}**\n\n{line}\n\n"
        f"```text\n{chart}\n```{keys}{more}",
        actions=actions,
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


async def run_turn(
    text: str,
    oversize: dict | None = None,
    message_id: str | None = None,
    accept_short: bool = False,
) -> None:
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
            accept_short=accept_short,
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
        # Thresholds of a cap this turn crossed, told once (vtai.notify.notices).
        for told in await notices.after_turn(s, _user_id(), outcome):
            reply.content += f"\n\n**{told.line(s.settings.usage_period)}**"
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
    reason = outcome.grant.reason if outcome.grant else None
    notices.refused(s, _user_id(), outcome.grant)  # the operator's event, once per cap/period
    if reason in ("model_not_allowed", "rate_limited"):
        if reason == "model_not_allowed":
            reply.content += await _fall_back()
        # Nothing to retype: the message goes again with one click.
        cl.user_session.set("retry_text", text)
        cl.user_session.set("retry_id", message_id)
        reply.actions = [cl.Action(name="retry", payload={}, label="Send again")]
    elif reason in QUOTA_REASONS or reason == "short_answer_only":
        ways = await _ways_through(outcome.grant, text, message_id)
        plans = await _billing_actions(reason)
        if _offers_plans(plans):
            reply.content = with_upgrade_hint(reply.content)
        reply.actions = ways + plans
        if ways:
            reply.content += "\n\nOr go on now:"
    await reply.send()


async def _fall_back() -> str:
    """The plan no longer includes the chat's model: switch the chat to one it does."""
    allowed = await _plan_models()
    if not allowed:
        return ""
    cl.user_session.set("model", allowed[0])
    await _send_picker(allowed, allowed[0])
    return f" This chat now uses {services().runner.labels(allowed[:1]).popitem()[0]}."


async def _free_model(current: str) -> str | None:
    """A model the plan includes that counts nothing against it (weight 0), if any."""
    catalogue = services().runner.catalogue
    if catalogue is None:
        return None
    for model in await _plan_models():
        entry = catalogue.get(model)
        if model != current and entry is not None and entry.weight == 0:
            return model
    return None


async def _ways_through(grant, text: str, message_id: str | None) -> list[cl.Action]:
    """The choices at a cap, never a bare no: a free model, and a short answer when what is
    left still allows one. The message is kept here (never taken from the client) to re-send."""
    cl.user_session.set("retry_text", text)
    cl.user_session.set("retry_id", message_id)
    actions = []
    free = await _free_model(cl.user_session.get("model") or services().settings.model)
    cl.user_session.set("free_model", free)
    if free is not None:
        label = services().runner.labels([free]).popitem()[0]
        actions.append(
            cl.Action(name="continue_free", payload={}, label=f"Continue on the free {label}")
        )
    if grant.reason == "short_answer_only":
        actions.append(
            cl.Action(
                name="shorter_answer",
                payload={},
                label=f"Shorter answer (about {grant.max_tokens:,} tokens)",
            )
        )
    return actions


# What refusal.py tells a user at a cap; with billing on, the chat offers the plans instead.
ADMIN_HINT = "For more, ask the administrator to move you to a higher tier."
UPGRADE_HINT = "For more, upgrade: each plan below shows its price and limits."


def with_upgrade_hint(refusal: str) -> str:
    if ADMIN_HINT in refusal:
        return refusal.replace(ADMIN_HINT, UPGRADE_HINT)
    return f"{refusal} {UPGRADE_HINT}"


def _billing_client():
    """The Stripe client when billing is on (it needs the database's billing tables)."""
    s = services()
    if not s.settings.billing or s.db is None:
        return None
    return checkout.client_for(s.settings)


# Top-ups add to the period's tokens only: they lift neither the daily nor the dollar cap.
NOT_TOPPED_UP = frozenset(
    {"daily_exhausted", "prompt_exceeds_daily", "usd_exhausted", "prompt_exceeds_usd"}
)


def _offers_plans(actions: list[cl.Action]) -> bool:
    return any(a.name == "upgrade" for a in actions)


async def _billing_actions(reason: str | None = None) -> list[cl.Action]:
    """One *Upgrade* action per plan the user may buy, labelled with its limits and price,
    and *Manage billing* for a Stripe customer; at a cap (`reason`), only plans that lift it.
    None with billing off."""
    client = _billing_client()
    if client is None:
        return []
    s = services()
    try:
        plans = await checkout.account(s.db.pool, s.settings, client, _user_id())
    except Exception as exc:
        log.warning("plans on sale unreadable (%s); no upgrade offered", type(exc).__name__)
        return []
    offers = {o["price_id"]: o for o in plans["offers"]}
    actions = [
        cl.Action(
            name="upgrade", payload={"price": pid}, label=offers[pid]["label"], icon="sparkles"
        )
        for pid in plans["upgrades"]
        if not (reason in NOT_TOPPED_UP and offers[pid]["kind"] == "topup")
    ]
    if plans["manage"]:
        actions.append(
            cl.Action(name="manage_billing", payload={}, label="Manage billing", icon="credit-card")
        )
    return actions


def _origin() -> str | None:
    """The chat page's origin, for Stripe's way back when VTAI_PUBLIC_URL is unset: the
    socket's Origin, which vtai.web.origins has already checked is the app's own."""
    environ = getattr(cl.context.session, "environ", None) or {}
    if environ.get("HTTP_ORIGIN"):
        return environ["HTTP_ORIGIN"]
    host = environ.get("HTTP_HOST")
    return f"{environ.get('wsgi.url_scheme', 'http')}://{host}" if host else None


async def upgrade(action: cl.Action) -> None:
    """The plan chosen: its Checkout link, or the subscription changed. The tier itself moves
    when Stripe's webhook lands; every turn and quota line reads it from the database, so this
    chat needs no reload."""
    client = _billing_client()
    if client is None:
        await cl.Message(content="Billing is off on this server: ask the administrator.").send()
        return
    s = services()
    price = (action.payload or {}).get("price")
    try:
        started = await checkout.start(
            s.db.pool, s.settings, client, _user_id(), str(price), _origin()
        )
    except checkout.BillingError as exc:
        await cl.Message(content=str(exc)).send()
        return
    except Exception as exc:
        log.warning("upgrade failed (%s)", type(exc).__name__)
        await cl.Message(content="Billing is unavailable just now: try again shortly.").send()
        return
    content = started.words(s.settings.usage_period)
    if started.url:
        content += f"\n\n[{PAY_LINK}]({started.url})"
    await cl.Message(content=content).send()


# The link that opens Stripe Checkout (in a new tab: the chat stays open).
PAY_LINK = "Open Stripe Checkout"


async def manage_billing(action: cl.Action) -> None:
    """A link to the user's Stripe customer portal."""
    client = _billing_client()
    if client is None:
        await cl.Message(content="Billing is off on this server: ask the administrator.").send()
        return
    s = services()
    try:
        url = await checkout.portal(s.db.pool, s.settings, client, _user_id(), _origin())
    except checkout.BillingError as exc:
        await cl.Message(content=str(exc)).send()
        return
    except Exception as exc:
        log.warning("billing portal failed (%s)", type(exc).__name__)
        await cl.Message(content="Billing is unavailable just now: try again shortly.").send()
        return
    await cl.Message(
        content=f"Invoices, payment method and cancelling: [Open the billing portal]({url})"
    ).send()


async def retry(action: cl.Action) -> None:
    text = cl.user_session.get("retry_text")
    await action.remove()
    if text:
        await run_turn(text, message_id=cl.user_session.get("retry_id"))


async def continue_free(action: cl.Action) -> None:
    """Switch this chat to the free model offered at the cap and send the message again."""
    model, text = cl.user_session.get("free_model"), cl.user_session.get("retry_text")
    await action.remove()
    if not model or not text:
        return
    cl.user_session.set("free_model", None)
    cl.user_session.set("model", model)
    await _send_picker(await _plan_models(), model)
    await run_turn(text, message_id=cl.user_session.get("retry_id"))


async def shorter_answer(action: cl.Action) -> None:
    text = cl.user_session.get("retry_text")
    await action.remove()
    if text:
        await run_turn(text, message_id=cl.user_session.get("retry_id"), accept_short=True)
