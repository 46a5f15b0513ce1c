"""Have LiteLLM build a finished stream's response once, not twice.

Exact billing needs `stream_options.include_usage`. With it, LiteLLM 1.106.2's stream wrapper
(`CustomStreamWrapper._finalize_completed_stream`) runs `litellm.stream_chunk_builder` over
the same chunks twice: once to make the usage chunk, and again to hand the response to the
success hooks. A build costs about 1 ms plus 0.06 ms per chunk (a chunk is about a token), so
the second one wastes about 20 ms of CPU on a 300-token answer, on the app's one event loop:
more than everything else metering adds (docs/performance.md). Here the second build returns
the first one's result, and a short answer is built on the loop, where it costs less than
LiteLLM's hop to a worker thread.

It is applied only to the LiteLLM release it was written against, and only if that code is
still there; otherwise LiteLLM runs unchanged and the log says so. tests/llm/test_stream_end.py
fails on a LiteLLM upgrade, so the patch gets checked again or removed.
"""

from __future__ import annotations

import inspect
import logging

import litellm
from litellm.litellm_core_utils import streaming_handler

log = logging.getLogger(__name__)

WRITTEN_FOR = "1.106.2"
# The one call this patch changes, as it reads in the release above.
CALL_SITE = "await asyncify(litellm.stream_chunk_builder)("
# Up to this many chunks (about 3 ms of building) the loop builds it. Longer answers still
# build in LiteLLM's worker thread, which has to hand the GIL back every 5 ms
# (sys.getswitchinterval), so other users' turns keep getting the loop meanwhile.
INLINE_CHUNKS = 40
_MEMO = "_vtai_built"
_original_asyncify = streaming_handler.asyncify


def _build_once(function):
    """Stands in for `asyncify` at the wrapper's one call site."""
    if function is not litellm.stream_chunk_builder:
        return _original_asyncify(function)

    async def build(*args, chunks, logging_obj=None, **kwargs):
        memo = getattr(logging_obj, _MEMO, None)
        if memo is not None and memo[0] is chunks and memo[1] == len(chunks):
            return memo[2]
        if len(chunks) <= INLINE_CHUNKS:
            built = function(*args, chunks=chunks, logging_obj=logging_obj, **kwargs)
        else:
            built = await _original_asyncify(function)(
                *args, chunks=chunks, logging_obj=logging_obj, **kwargs
            )
        if logging_obj is not None:
            setattr(logging_obj, _MEMO, (chunks, len(chunks), built))
        return built

    return build


def version() -> str:
    from importlib.metadata import version as installed

    return installed("litellm")


def applicable() -> str | None:
    """None if the patch fits the installed LiteLLM, else why not."""
    if version() != WRITTEN_FOR:
        return f"LiteLLM is {version()}, the patch was written for {WRITTEN_FOR}"
    finalize = streaming_handler.CustomStreamWrapper._finalize_completed_stream
    try:
        source = inspect.getsource(finalize)
    except (OSError, TypeError):
        return "LiteLLM's source is not installed, so the patch can't check its call site"
    if CALL_SITE not in source:
        return "LiteLLM's end of stream no longer reads as the patch expects"
    return None


def apply() -> bool:
    """Idempotent. True if LiteLLM now builds a finished stream's response once."""
    if streaming_handler.asyncify is _build_once:
        return True
    why_not = applicable()
    if why_not is not None:
        log.warning("streams are built twice at their end, as LiteLLM does: %s", why_not)
        return False
    streaming_handler.asyncify = _build_once
    return True


def remove() -> None:
    streaming_handler.asyncify = _original_asyncify
