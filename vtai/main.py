"""Chainlit entry point: `chainlit run vtai/main.py`. Handlers only; the work is in vtai.ui.chat."""

import gc
import os

import chainlit as cl
import chainlit.server

from vtai import launch
from vtai.accounts import routes as accounts
from vtai.admin import routes as admin
from vtai.api import routes as api
from vtai.billing import routes as billing
from vtai.ops import routes as ops
from vtai.settings import load_settings
from vtai.ui import chat, feedback_guard, history, socket_guard
from vtai.web import origins, sessions, uploads

# /admin and /admin/api/*, ahead of Chainlit's catch-all page route.
admin.register(chainlit.server.app)
# /v1: the OpenAI-compatible API, metered by the same turn path as the chat.
api.register(chainlit.server.app)
# /healthz, /readyz and /metrics.
ops.register(chainlit.server.app)
# /billing/*: checkout, the customer portal and Stripe's webhook (off without STRIPE_SECRET_KEY).
billing.register(chainlit.server.app)
# /signup and /reset: accounts people make and recover themselves.
accounts.register(chainlit.server.app)
# Who may call the app, whose login still holds, and what a chat client may send.
_settings = load_settings()
# `chainlit run vtai/main.py` works without `make run`: Chainlit checks for its secret after
# loading this module, and finds the one `make run` would use, kept in the data dir.
os.environ["CHAINLIT_AUTH_SECRET"] = launch.ensure_auth_secret(_settings.data_dir, _settings)
origins.install(chainlit.server.app, chainlit.server.sio, _settings)
sessions.install(chainlit.server.app, chainlit.server.sio, _settings)
socket_guard.install(chainlit.server.sio, _settings)
feedback_guard.install(chainlit.server.app)
uploads.install(chainlit.server.app)


@cl.on_app_startup
async def on_app_startup():
    await chat.startup()
    # What start-up loaded (Chainlit, LiteLLM, its price map...) lives as long as the process:
    # frozen out of the collector's sight, a full collection no longer walks it and stalls
    # every request for ~200 ms (docs/architecture.md, "Start-up frozen for the collector").
    gc.collect()
    gc.freeze()


@cl.on_app_shutdown
async def on_app_shutdown():
    await chat.shutdown()


@cl.password_auth_callback
async def on_login(username: str, password: str):
    return await chat.login(username, password)


@cl.data_layer
def data_layer():
    # Registered even with VTAI_HISTORY=off, so Chainlit never falls back to DATABASE_URL.
    try:
        return history.data_layer(chat.services())
    except RuntimeError:
        # Chainlit may first ask at shutdown, after the services have stopped.
        return None


@cl.on_chat_resume
async def on_chat_resume(thread):
    await chat.resume(thread)


@cl.on_chat_start
async def on_chat_start():
    await chat.start()


@cl.on_chat_end
async def on_chat_end():
    await chat.end()


@cl.on_settings_update
async def on_settings_update(values: dict):
    await chat.settings_update(values)


@cl.on_message
async def on_message(message: cl.Message):
    await chat.message(message)


@cl.action_callback("retry")
async def on_retry(action: cl.Action):
    await chat.retry(action)


@cl.action_callback("continue_free")
async def on_continue_free(action: cl.Action):
    await chat.continue_free(action)


@cl.action_callback("shorter_answer")
async def on_shorter_answer(action: cl.Action):
    await chat.shorter_answer(action)


@cl.action_callback("upgrade")
async def on_upgrade(action: cl.Action):
    await chat.upgrade(action)


@cl.action_callback("manage_billing")
async def on_manage_billing(action: cl.Action):
    await chat.manage_billing(action)
