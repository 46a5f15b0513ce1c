"""File uploads (`POST /project/file`): refused before their body is read.

VT.ai never reads attachments, so `.chainlit/config.toml` turns them off. Chainlit's upload
route still takes a request while they are off: FastAPI parses the whole multipart body (and the
route then reads the file into memory) before anything checks the config, the session or the
size. This middleware answers such a request from its headers alone:

- attachments off (`[features.spontaneous_file_upload] enabled = false`, the default here):
  403, whatever the size, logged in or not;
- attachments on: a body over `max_size_mb` (plus room for the multipart framing) is refused
  with 413 from its Content-Length, and a body without one is cut off once it has passed the
  limit.

Either way the response says `Connection: close`, so the server drops the rest of the body
instead of reading it. Files Chainlit does store (an upload when attachments are on, or an
element's content) are made readable by the server's user alone.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

from vtai.web.replies import refuse

log = logging.getLogger(__name__)

UPLOAD_PATH = "/project/file"
# Room for the multipart boundary, part headers and the form's other fields.
MULTIPART_OVERHEAD = 64 * 1024


def install(app) -> None:
    """Called once from vtai/main.py with Chainlit's FastAPI app, before it starts."""
    app.add_middleware(UploadGuard)
    _private_files()


def upload_limit() -> int | None:
    """The largest upload body accepted in bytes; None when attachments are off."""
    from chainlit.config import config

    spec = config.features.spontaneous_file_upload
    # Chainlit takes a missing section as "anything goes"; VT.ai reads no attachments, so
    # only an explicit `enabled = true` turns them on.
    if spec is None or not spec.enabled:
        return None
    max_mb = spec.max_size_mb if spec.max_size_mb is not None else 500
    return int(max_mb * 1024 * 1024) + MULTIPART_OVERHEAD


class UploadGuard:
    """ASGI middleware: refuses an upload from its headers, before any of its body is read."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if not _is_upload(scope):
            return await self.app(scope, receive, send)
        limit = upload_limit()
        if limit is None:
            return await _refuse(send, 403, "File uploads are turned off on this server.")
        length = _content_length(scope)
        if length is not None and length > limit:
            return await _refuse(send, 413, "The file is larger than this server accepts.")
        return await self.app(scope, _capped(receive, limit), send)


def _capped(receive, limit: int):
    """A receive() that stops a body without Content-Length once it passes the limit."""
    seen = 0

    async def capped():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                # The client lied about its length or sent none: end the request here.
                return {"type": "http.disconnect"}
        return message

    return capped


def _is_upload(scope) -> bool:
    if scope["type"] != "http" or scope["method"] != "POST":
        return False
    path = scope.get("path", "").rstrip("/")
    # Behind CHAINLIT_ROOT_PATH the route is ROOT/project/file.
    return path == UPLOAD_PATH or path.endswith(UPLOAD_PATH)


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _refuse(send, status: int, detail: str) -> None:
    # The body was not read: the connection can't carry another request.
    await refuse(send, status, detail, ((b"connection", b"close"),))


def _private_files() -> None:
    """Chainlit's `.files/` holds what sessions persist: readable by this user alone."""
    from chainlit.config import FILES_DIRECTORY
    from chainlit.session import BaseSession

    with contextlib.suppress(OSError):
        _private_dir(FILES_DIRECTORY)
    original = BaseSession.persist_file
    if getattr(original, "_vtai_private", False):
        return

    @functools.wraps(original)
    async def persist_file(self, *args, **kwargs):
        # The directories are private before anything is written into them, so the moment
        # between Chainlit writing a file (0644 by umask) and the chmod below exposes nothing.
        with contextlib.suppress(OSError):
            _private_dir(self.files_dir.parent)
            _private_dir(self.files_dir)
        ref = await original(self, *args, **kwargs)
        with contextlib.suppress(OSError, KeyError, TypeError):
            os.chmod(self.files[ref["id"]]["path"], 0o600)
        return ref

    persist_file._vtai_private = True
    BaseSession.persist_file = persist_file


def _private_dir(path) -> None:
    path.mkdir(mode=0o700, exist_ok=True)
    path.chmod(0o700)
