"""A FAKE OpenAI-compatible provider on 127.0.0.1, for tests only.

It stands in for real providers, which can't be reached from here, so LiteLLM's real HTTP
client and error mapping run against answers we control. The path picks the behaviour: point
LiteLLM's `api_base` at `http://127.0.0.1:PORT/<mode>` with `model="openai/fake"`.

Modes: ok, no-usage, 401, 429, 500, hang, break (the stream stops midway), ctx (context too
long), 404, bytes (usage counted by a byte-level tokenizer, as a worst case: every UTF-8 byte
of the prompt is a token), slow (a long answer, a token every 100 ms, byte usage), and script
(the last user message picks the mode with a `#mode:NAME` tag).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

from aiohttp import web

from tests.background_server import BackgroundServer

ANSWER = "Sure. Here is a short and complete answer to your question, in plain words."


def _chunk(content: str | None = None, finish: str | None = None, usage: dict | None = None):
    body = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": "fake",
        "choices": []
        if usage
        else [
            {"index": 0, "delta": {"content": content} if content else {}, "finish_reason": finish}
        ],
    }
    if usage:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n".encode()


def _error(status: int, message: str, code: str | None = None) -> web.Response:
    payload = {"error": {"message": message, "type": "fake_error", "code": code}}
    return web.json_response(payload, status=status)


LONG_ANSWER = " ".join(f"word{i}" for i in range(2000))


def byte_tokens(messages: list[dict]) -> int:
    """This provider's own tokenizer: a token per UTF-8 byte, plus 4 per message and 3."""
    return sum(len(str(m.get("content") or "").encode()) + 4 for m in messages) + 3


def _scripted(body: dict) -> str:
    for m in reversed(body.get("messages") or []):
        if m.get("role") == "user":
            text = str(m.get("content") or "")
            if "#mode:" in text:
                return text.split("#mode:", 1)[1].split()[0]
            return "bytes"
    return "bytes"


async def _completions(request: web.Request) -> web.StreamResponse:
    mode = request.match_info["mode"]
    body = await request.json()
    if mode == "script":
        mode = _scripted(body)
    request.app["calls"].append(mode)
    request.app["bodies"].append(body)
    request.app["keys"].append(request.headers.get("Authorization"))
    with request.app["arrived"]:
        request.app["arrived"].notify_all()
    if mode == "401":
        return _error(401, "Incorrect API key provided: sk-fake***", "invalid_api_key")
    if mode == "429":
        return _error(429, "Rate limit reached for requests", "rate_limit_exceeded")
    if mode == "500":
        return _error(500, "The server had an error while processing your request")
    if mode == "404":
        return _error(404, "The model `fake` does not exist", "model_not_found")
    if mode == "ctx":
        return _error(
            400, "This model's maximum context length is 10 tokens.", "context_length_exceeded"
        )
    if mode == "hang":
        await asyncio.sleep(3600)
    answer = LONG_ANSWER if mode in ("slow", "bytes") else ANSWER
    words = answer.split(" ")[: body.get("max_tokens") or None]
    prompt = byte_tokens(body.get("messages") or []) if mode in ("slow", "bytes") else 11
    usage = (
        None
        if mode == "no-usage"
        else {
            "prompt_tokens": prompt,
            "completion_tokens": len(words),
            "total_tokens": prompt + len(words),
        }
    )
    if not body.get("stream"):
        payload = {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": "fake",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": " ".join(words)},
                }
            ],
        }
        if usage:
            payload["usage"] = usage
        return web.json_response(payload)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i, word in enumerate(words):
        await response.write(_chunk(word if i == 0 else " " + word))
        if mode == "break" and i == 4:
            # Drop the connection mid-stream, as a crashing upstream would.
            request.transport.close()
            return response
        await asyncio.sleep(0.1 if mode == "slow" else 0.005)
    await response.write(
        _chunk(finish="length" if len(words) == body.get("max_tokens") else "stop")
    )
    if usage and (body.get("stream_options") or {}).get("include_usage"):
        await response.write(_chunk(usage=usage))
    await response.write(b"data: [DONE]\n\n")
    return response


class FakeProvider(BackgroundServer):
    """Runs the fake provider in a background thread; `url(mode)` is an api_base."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.bodies: list[dict] = []
        # each request's Authorization header, in arrival order
        self.keys: list[str | None] = []
        self.arrived = threading.Condition()

    def build_app(self) -> web.Application:
        app = web.Application()
        app["calls"] = self.calls
        app["bodies"] = self.bodies
        app["keys"] = self.keys
        app["arrived"] = self.arrived
        app.router.add_post("/{mode}/chat/completions", _completions)
        return app

    async def wait_calls(self, count: int, timeout: float = 30.0) -> None:
        """Until `count` requests have arrived (the server runs in its own thread)."""

        def wait() -> bool:
            with self.arrived:
                return self.arrived.wait_for(lambda: len(self.calls) >= count, timeout)

        if not await asyncio.to_thread(wait):
            raise TimeoutError(f"{len(self.calls)} of {count} requests arrived in {timeout}s")
