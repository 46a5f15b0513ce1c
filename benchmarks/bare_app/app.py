"""A bare Chainlit chat, the baseline of benchmarks/socket_load.py: the same LiteLLM call
VT.ai makes, streamed token by token, with none of VT.ai (no metering, no ledger, no history,
no guards). Not VT.ai's code: VT.ai itself has no switch that turns metering off.

    BARE_MODEL=openai/fake OPENAI_API_BASE=http://127.0.0.1:PORT/v1 OPENAI_API_KEY=x \
    CHAINLIT_AUTH_SECRET=... chainlit run benchmarks/bare_app/app.py --headless

Any password equal to BARE_PASSWORD logs in (a login as cheap as a login can be).
"""

import os

import chainlit as cl
import litellm
from chainlit.input_widget import Select

MODEL = os.environ.get("BARE_MODEL", "openai/fake")
MAX_TOKENS = int(os.environ.get("BARE_MAX_TOKENS", "512"))  # VT.ai's default VTAI_MAX_TOKENS

if MODEL.startswith("local/"):
    # The in-process model is a LiteLLM custom provider VT.ai registers; the model runtime
    # only (vtai.llm.local_model), none of VT.ai's metering.
    from vtai.llm import local_model

    local_model.register()


@cl.password_auth_callback
async def on_login(username: str, password: str):
    if password and password == os.environ.get("BARE_PASSWORD"):
        return cl.User(identifier=username)
    return None


@cl.on_chat_start
async def on_chat_start():
    cl.user_session.set("history", [])
    # The same model picker VT.ai sends when a chat opens.
    await cl.ChatSettings(
        [Select(id="model", label="Model", values=[MODEL], initial_value=MODEL)]
    ).send()


@cl.on_message
async def on_message(message: cl.Message):
    history = cl.user_session.get("history")
    history.append({"role": "user", "content": message.content})
    reply = cl.Message(content="")
    stream = await litellm.acompletion(
        model=MODEL, messages=history, stream=True, max_tokens=MAX_TOKENS, num_retries=0
    )
    async for chunk in stream:
        delta = chunk.choices[0].delta.content if chunk.choices else None
        if delta:
            await reply.stream_token(delta)
    history.append({"role": "assistant", "content": reply.content})
    await reply.send()
