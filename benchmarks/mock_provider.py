"""A fast mock OpenAI-compatible provider, in a process of its own, for benchmarks/api_vs_proxy.py.

`POST /v1/chat/completions` (any `/<prefix>/chat/completions` too) answers every request with
the same CHUNKS-token answer: streamed as that many server-sent events with `--gap-ms` between
them (0: back to back; a `[gap MS]` tag in the last message sets it for that request), then a
finish chunk, then usage when `stream_options.include_usage` asks for it, as OpenAI sends it;
or as one JSON body. Usage is fixed (PROMPT_TOKENS and the chunk count), so a metered side
counts the same tokens on every request.

    python -m benchmarks.mock_provider [--port 0] [--chunks 20] [--gap-ms 0]

It prints `ready <port>` once it listens (port 0: a free one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time

from aiohttp import web

PROMPT_TOKENS = 12
GAP_TAG = re.compile(r"\[gap ([0-9.]+)\]")


def answer(chunks: int) -> list[str]:
    """The answer's tokens: what every client must receive, in order."""
    return [("Sure" if i == 0 else f" w{i}") for i in range(chunks)]


def _event(body: dict) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def gap_of(body: dict, default: float) -> float:
    """Seconds between tokens: the last message's `[gap MS]` tag, else the default."""
    messages = body.get("messages") or [{}]
    found = GAP_TAG.search(str(messages[-1].get("content") or ""))
    return float(found.group(1)) / 1000 if found else default


def build_app(chunks: int, default_gap: float) -> web.Application:
    tokens = answer(chunks)

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        gap = gap_of(body, default_gap)
        limit = body.get("max_completion_tokens") or body.get("max_tokens") or chunks
        words = tokens[: min(chunks, limit)]
        usage = {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": len(words),
            "total_tokens": PROMPT_TOKENS + len(words),
        }
        finish = "length" if len(words) < chunks else "stop"
        base = {"id": "chatcmpl-mock", "created": int(time.time()), "model": body.get("model")}
        if not body.get("stream"):
            return web.json_response(
                {
                    **base,
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": finish,
                            "message": {"role": "assistant", "content": "".join(words)},
                        }
                    ],
                    "usage": usage,
                }
            )
        chunk = {**base, "object": "chat.completion.chunk"}
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i, word in enumerate(words):
            delta = {"role": "assistant", "content": word} if i == 0 else {"content": word}
            choice = {"index": 0, "delta": delta, "finish_reason": None}
            await response.write(_event({**chunk, "choices": [choice]}))
            if gap:
                await asyncio.sleep(gap)
        choice = {"index": 0, "delta": {}, "finish_reason": finish}
        await response.write(_event({**chunk, "choices": [choice]}))
        if (body.get("stream_options") or {}).get("include_usage"):
            await response.write(_event({**chunk, "choices": [], "usage": usage}))
        await response.write(b"data: [DONE]\n\n")
        return response

    async def models(_request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_post("/{prefix}/chat/completions", completions)
    app.router.add_post("/chat/completions", completions)
    app.router.add_get("/v1/models", models)
    return app


async def serve(port: int, chunks: int, gap_ms: float) -> None:
    runner = web.AppRunner(build_app(chunks, gap_ms / 1000), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
    await site.start()
    bound = runner.addresses[0][1]
    print(f"ready {bound}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--chunks", type=int, default=20)
    p.add_argument("--gap-ms", type=float, default=0.0)
    args = p.parse_args()
    try:
        asyncio.run(serve(args.port, args.chunks, args.gap_ms))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
