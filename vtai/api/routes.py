"""The OpenAI-compatible API under `/v1`, on the chat's server and port: the same door as the chat.

`POST /v1/chat/completions` (streamed as server-sent events, or not) and `GET /v1/models`,
authenticated by a personal API key (`Authorization: Bearer vtai-...`, vtai.api.keys). Each
completion is one turn of vtai.metering.turn, exactly as a chat message is: reserved by
vtai_reserve() under the key owner's plan (max_tokens clamped), called through LiteLLM,
recorded as one ledger row (`source = 'api'`, the key's id) and settled. A refusal is a row too,
and an error in OpenAI's shape (vtai.api.errors). A client that goes away mid-stream is charged
as a stopped chat turn is.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, FastAPI, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from vtai.api import errors
from vtai.llm import patterns
from vtai.metering.turn import TurnOutcome, TurnRequest, oversize
from vtai.notify import notices
from vtai.ops import metrics

log = logging.getLogger(__name__)

ROLES = frozenset({"system", "developer", "user", "assistant"})
# Messages in one request: fitting a history to the context recounts it, and past this many a
# request could hold the event loop (every chat on the server) for seconds.
MAX_MESSAGES = 256
# Requests refused before a key was recognised: counted here, never stored.
unauthenticated = 0


class BadRequest(Exception):
    """A body the API can't take: 400 with this one line."""


def _services():
    from vtai.ui import chat

    return chat.services()


async def _owner(request: Request):
    """The key's owner, or the 401 to send."""
    global unauthenticated
    from vtai.api import keys

    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    owner = None
    if scheme.lower() == "bearer" and token.strip():
        try:
            owner = await keys.owner(_services(), token.strip())
        except keys.KeysUnavailable as exc:
            return errors.refusal("unavailable", str(exc), None)
    if owner is None:
        unauthenticated += 1
        metrics.api_unauthenticated()
        return errors.error(
            401,
            "Missing, unknown, revoked or expired API key: create one on /account and send it "
            "as `Authorization: Bearer <key>`.",
            "authentication_error",
            "invalid_api_key",
        )
    return owner


async def _body(request: Request, limit: int) -> bytes | Response:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        return _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> Response:
    return errors.error(
        413,
        f"The request body is over {limit:,} bytes (VTAI_MAX_BODY_BYTES).",
        "invalid_request_error",
        "request_too_large",
    )


def _text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise BadRequest(f"{where}: only text content parts are supported")
            if not isinstance(part.get("text"), str):
                raise BadRequest(f"{where}: a text part needs a string `text`")
            parts.append(part["text"])
        return "".join(parts)
    raise BadRequest(f"{where}.content must be a string or a list of text parts")


def _whole(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"{name} must be a whole number of at least 1")
    return value


def parse(raw: bytes) -> dict:
    """The request as the turn needs it; BadRequest names what is wrong."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the body is not JSON") from None
    except RecursionError:
        raise BadRequest("the body is nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise BadRequest("model is required: one of GET /v1/models")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    if len(messages) > MAX_MESSAGES:
        raise BadRequest(f"messages: at most {MAX_MESSAGES} in one request")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(sorted(ROLES))}")
        role = "system" if m["role"] == "developer" else m["role"]
        clean.append({"role": role, "content": _text(m.get("content"), f"messages[{i}]")})
    if clean[-1]["role"] != "user":
        raise BadRequest("the last message must be the user's")
    if not clean[-1]["content"].strip():
        raise BadRequest("the last message is empty")
    limit = _whole(body, "max_completion_tokens") or _whole(body, "max_tokens")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("stream_options must be an object")
    return {
        "model": model,
        "messages": clean,
        "max_tokens": limit,
        "stream": stream,
        "include_usage": bool(options.get("include_usage")),
    }


def _request(owner, call: dict, max_chars: int) -> TurnRequest:
    history, last = call["messages"][:-1], call["messages"][-1]
    req = TurnRequest(
        user_id=owner.user_id,
        session_id=f"api:{owner.key_id}",
        model=call["model"],
        history=history,
        text=last["content"],
        source="api",
        api_key_id=owner.key_id,
        max_tokens=call["max_tokens"],
        # An API client asked for max_tokens; a cap that leaves fewer is answered short
        # (finish_reason "length"), as OpenAI does, rather than offered as a choice.
        accept_short=True,
    )
    for m in call["messages"]:
        if len(m["content"]) > max_chars:
            # Refused by the turn with a row, as the chat refuses it; nothing of it is kept.
            req.oversize = oversize(m["content"])
            req.text = ""
            break
    return req


def _usage(outcome: TurnOutcome) -> dict:
    u = outcome.usage or {}
    return {
        "prompt_tokens": u.get("prompt_tokens", 0),
        "completion_tokens": u.get("completion_tokens", 0),
        "total_tokens": u.get("total_tokens", 0),
    }


def _refused(outcome: TurnOutcome) -> Response:
    grant = outcome.grant
    if outcome.kind == "invalid":
        return errors.error(400, outcome.notice or "invalid", "invalid_request_error")
    if outcome.kind == "failed":
        # Not retried by the SDKs: a failed call may already be charged its prompt.
        timed_out = "did not answer within" in (outcome.notice or "")
        return errors.error(
            504 if timed_out else 502,
            outcome.notice or "the model failed",
            "api_error",
            "upstream_timeout" if timed_out else "upstream_error",
            {"x-should-retry": "false"},
        )
    reason = outcome.reason or (grant.reason if grant is not None else "invalid")
    return errors.refusal(reason, outcome.notice or reason, grant)


def _refused_row(services, owner, reason: str, notice: str) -> None:
    """A known key's request refused before it was a turn is still a ledger row (charged 0),
    as every refusal of a known user is; written in the background, like a turn's refusal."""
    req = TurnRequest(
        user_id=owner.user_id,
        session_id=f"api:{owner.key_id}",
        model="",
        history=[],
        text="",
        source="api",
        api_key_id=owner.key_id,
    )
    services.runner.refuse(req, notice, reason=reason)


class Turn:
    """One API turn running in its own task, its tokens on a queue (None: the turn ended)."""

    def __init__(self, services, req: TurnRequest):
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.req = req
        self.task = asyncio.create_task(services.runner.run(req, self._token))
        self.task.add_done_callback(lambda _: self.queue.put_nowait(None))

    async def _token(self, text: str) -> None:
        self.queue.put_nowait(text)
        # Let the response write it now: tokens that arrived together would otherwise all be
        # read before the first is sent.
        await asyncio.sleep(0)

    def stop(self) -> None:
        """The client went away: the turn is stopped and charged as a stopped chat turn."""
        if not self.task.done():
            self.task.cancel()


def _chunk(cid: str, created: int, model: str, delta: dict, finish=None, usage=None) -> str:
    body = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [] if usage is not None else [
            {"index": 0, "delta": delta, "finish_reason": finish}
        ],
    }  # fmt: skip
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _stream(turn: Turn, first: str, call: dict, cid: str, created: int) -> AsyncIterator:
    model = call["model"]
    try:
        yield _chunk(cid, created, model, {"role": "assistant", "content": first})
        while (token := await turn.queue.get()) is not None:
            yield _chunk(cid, created, model, {"content": token})
        outcome: TurnOutcome = turn.task.result()
        if outcome.kind == "answered":
            yield _chunk(cid, created, model, {}, outcome.finish or "stop")
        else:
            message = outcome.notice or "the answer was interrupted"
            yield f"data: {json.dumps({'error': {'message': message, 'type': 'api_error'}})}\n\n"
        if call["include_usage"]:
            yield _chunk(cid, created, model, {}, usage=_usage(outcome))
        # Headers are gone by now: a quota warning rides as an SSE comment, which clients skip.
        warning = notices.header(await notices.after_api_turn(_services(), turn.req, outcome))
        if warning:
            yield f": x-vtai-quota-warning: {warning}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        turn.stop()


async def chat_completions(request: Request) -> Response:
    owner = await _owner(request)
    if isinstance(owner, Response):
        return owner
    services = _services()
    raw = await _body(request, services.settings.max_body_bytes)
    if isinstance(raw, Response):
        _refused_row(services, owner, "request_too_large", "the body was over the limit")
        return raw
    try:
        call = parse(raw)
    except BadRequest as exc:
        _refused_row(services, owner, "bad_request", str(exc))
        return errors.error(400, str(exc), "invalid_request_error", "invalid_request")
    turn = Turn(services, _request(owner, call, services.settings.max_message_chars))
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    first = await turn.queue.get()
    if first is None:
        outcome: TurnOutcome = turn.task.result()
        if outcome.kind != "answered":
            notices.refused(services, owner.user_id, outcome.grant)
            return _refused(outcome)
        first = ""
    if call["stream"]:
        return StreamingResponse(
            _stream(turn, first, call, cid, created),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )
    try:
        parts = [first]
        while (token := await turn.queue.get()) is not None:
            parts.append(token)
        outcome = turn.task.result()
    finally:
        turn.stop()
    if outcome.kind != "answered":
        return _refused(outcome)
    warning = notices.header(await notices.after_api_turn(services, turn.req, outcome))
    response = JSONResponse(
        {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": call["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": outcome.reply},
                    "finish_reason": outcome.finish or "stop",
                }
            ],
            "usage": _usage(outcome),
        },
        # The oldest messages left out to fit the model's window or the quota: said, not silent.
        headers={"x-vtai-notice": outcome.notice.encode("ascii", "replace").decode()}
        if outcome.notice
        else None,
    )
    if warning:
        # A threshold of a cap crossed by this request, told once: `tokens 80%, daily 100%`.
        response.headers["x-vtai-quota-warning"] = warning
    return response


async def list_models(request: Request) -> Response:
    owner = await _owner(request)
    if isinstance(owner, Response):
        return owner
    services = _services()
    await services.runner.refresh_models()
    offered = services.runner.offered()
    try:
        usage = await services.gate.usage(owner.user_id)
    except Exception as exc:
        log.warning("plan lookup for /v1/models failed (%s)", type(exc).__name__)
        return errors.refusal("unavailable", "The usage service is unavailable.", None)
    allowed = patterns.allowed(usage.models, offered) if usage is not None else []
    return JSONResponse(
        {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "vtai"} for m in allowed
            ],
        }
    )


async def unknown_url(request: Request) -> Response:
    """Any other path under /v1: OpenAI's 404, not the chat's web page (which Chainlit's
    catch-all would serve to a GET) or a bare 405."""
    return errors.error(
        404,
        f"Invalid URL ({request.method} {request.url.path}): this server offers "
        "POST /v1/chat/completions and GET /v1/models.",
        "invalid_request_error",
        "unknown_url",
    )


def build_router() -> APIRouter:
    router = APIRouter()
    router.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    router.add_api_route("/v1/models", list_models, methods=["GET"])
    # Last: the two above match first.
    router.add_api_route(
        "/v1/{path:path}",
        unknown_url,
        methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
        include_in_schema=False,
    )
    return router


def register(app: FastAPI) -> None:
    """Add /v1 ahead of Chainlit's catch-all route (again on a re-import, replacing it)."""
    app.router.routes[:] = [r for r in app.router.routes if not getattr(r, "vtai_api", False)]
    before = len(app.router.routes)
    app.include_router(build_router())
    added = app.router.routes[before:]
    for route in added:
        route.vtai_api = True
    del app.router.routes[before:]
    app.router.routes[0:0] = added
