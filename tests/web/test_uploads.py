"""Uploads: off, and refused from the request's headers before its body is read."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import stat
import threading
import time
import tomllib
import uuid
from urllib.parse import urlsplit

import httpx
import psutil
import pytest

from tests.browser import ROOT, running_app
from vtai.web import uploads

MiB = 1024 * 1024


def test_uploads_are_off_by_default():
    config = tomllib.loads((ROOT / ".chainlit" / "config.toml").read_text())
    spontaneous = config["features"]["spontaneous_file_upload"]
    assert spontaneous["enabled"] is False
    assert spontaneous["max_files"] == 0 and spontaneous["max_size_mb"] <= 1
    # What the middleware reads (Chainlit loads the same file from the app's directory).
    assert uploads.upload_limit() is None


def _request(path: str = "/project/file", length: int | None = 600 * MiB) -> dict:
    headers = [(b"host", b"x"), (b"content-type", b"multipart/form-data; boundary=b")]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return {"type": "http", "method": "POST", "path": path, "headers": headers}


async def _call(guard, scope, body_chunks=()) -> tuple[list[dict], int]:
    sent: list[dict] = []
    reads = 0
    chunks = list(body_chunks)

    async def receive():
        nonlocal reads
        reads += 1
        if chunks:
            return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await guard(scope, receive, send)
    return sent, reads


async def test_upload_guard_answers_from_the_headers_alone():
    async def app(scope, receive, send):  # Chainlit's app: must not be reached
        raise AssertionError("the upload reached the app")

    guard = uploads.UploadGuard(app)
    for scope in (
        _request(),
        _request(length=10),
        _request(length=None),  # chunked: no length to go by
        _request("/chat/project/file"),  # behind CHAINLIT_ROOT_PATH
        _request("/project/file/"),
    ):
        sent, reads = await _call(guard, scope, [b"x" * 1024])
        assert reads == 0, scope
        assert sent[0]["status"] == 403
        assert (b"connection", b"close") in sent[0]["headers"]


async def test_upload_guard_passes_everything_else_through():
    reached = []

    async def app(scope, receive, send):
        reached.append(scope.get("path", scope["type"]))

    guard = uploads.UploadGuard(app)
    await guard(
        {"type": "http", "method": "GET", "path": "/project/file/abc", "headers": []}, None, None
    )
    await guard(
        {"type": "http", "method": "POST", "path": "/project/files", "headers": []}, None, None
    )
    await guard({"type": "websocket", "path": "/ws/socket.io", "headers": []}, None, None)
    await guard({"type": "lifespan"}, None, None)
    assert reached == ["/project/file/abc", "/project/files", "/ws/socket.io", "lifespan"]


async def test_when_uploads_are_turned_on_the_size_limit_holds_without_reading(monkeypatch):
    from chainlit.config import config

    spec = config.features.spontaneous_file_upload
    monkeypatch.setattr(spec, "enabled", True)
    monkeypatch.setattr(spec, "max_size_mb", 1)
    received = []

    async def app(scope, receive, send):
        while True:
            message = await receive()
            received.append(message)
            if message["type"] != "http.request" or not message.get("more_body"):
                return

    guard = uploads.UploadGuard(app)
    sent, reads = await _call(guard, _request(length=600 * MiB))
    assert reads == 0 and sent[0]["status"] == 413 and not received

    sent, _ = await _call(guard, _request(length=1000), [b"x" * 1000])
    assert not sent and received[-1]["body"] == b"x" * 1000

    # No Content-Length: the body is cut off once it passes the limit.
    received.clear()
    await _call(guard, _request(length=None), [b"x" * MiB] * 5)
    assert received[-1] == {"type": "http.disconnect"}
    assert sum(len(m.get("body", b"")) for m in received) <= 2 * MiB


async def test_files_chainlit_persists_are_private(tmp_path, monkeypatch):
    import chainlit.config
    from chainlit.session import HTTPSession

    files = tmp_path / ".files"
    files.mkdir(mode=0o755)
    monkeypatch.setattr(chainlit.config, "FILES_DIRECTORY", files)
    uploads._private_files()
    session = HTTPSession(id=str(uuid.uuid4()), client_type="webapp")
    ref = await session.persist_file("notes.txt", "text/plain", content=b"secret")
    path = session.files[ref["id"]]["path"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(session.files_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(files.stat().st_mode) == 0o700


def _app_process(port: int) -> psutil.Process:
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "chainlit" in " ".join(child.cmdline()) and str(port) in child.cmdline():
                return child
    raise AssertionError(f"no chainlit process on port {port}")


def _rss(proc: psutil.Process) -> int:
    return proc.memory_info().rss


def _upload(host: str, port: int, claimed: int, to_send: int) -> tuple[bytes, float, int]:
    """POST a multipart upload claiming `claimed` bytes, pushing up to `to_send` of them from
    another thread while waiting for the answer. Returns (response, seconds, bytes sent)."""
    sock = socket.create_connection((host, port), timeout=10)
    head = (
        f"POST /project/file?session_id={uuid.uuid4()} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Content-Type: multipart/form-data; boundary=vtai\r\n"
        f"Content-Length: {claimed}\r\n\r\n"
        '--vtai\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    sent = 0
    began = time.monotonic()
    sock.sendall(head)

    def push():
        nonlocal sent
        chunk = b"\0" * (256 * 1024)
        with contextlib.suppress(OSError):
            while sent < to_send:
                sent += sock.send(chunk)

    pusher = threading.Thread(target=push, daemon=True)
    pusher.start()
    response = b""
    with contextlib.suppress(OSError):
        while b"\r\n\r\n" not in response:
            data = sock.recv(65536)
            if not data:
                break
            response += data
    elapsed = time.monotonic() - began
    # The server closes the connection after refusing; the pusher then stops on an error.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    pusher.join(timeout=10)
    return response, elapsed, sent


@pytest.mark.browser
async def test_upload_refused_before_reading_the_body(db_url, tmp_path):
    """Needs `uploads.install(chainlit.server.app)` in vtai/main.py."""
    async with running_app(db_url, tmp_path) as base:
        parts = urlsplit(base)
        proc = _app_process(parts.port)
        before = _rss(proc)
        # 600 MiB claimed, a few bytes sent: a server that reads the body first never answers.
        response, elapsed, _ = await asyncio.to_thread(
            _upload, parts.hostname, parts.port, 600 * MiB, 0
        )
        assert response.startswith(b"HTTP/1.1 403"), response[:200]
        assert elapsed < 5
        # 50 MB actually streamed: refused just as fast, and most of it never leaves the client.
        response, elapsed, sent = await asyncio.to_thread(
            _upload, parts.hostname, parts.port, 50 * MiB, 50 * MiB
        )
        assert response.startswith(b"HTTP/1.1 403"), response[:200]
        assert elapsed < 5 and sent < 50 * MiB
        grew = _rss(proc) - before
        assert grew < 20 * MiB, f"the server grew by {grew / MiB:.0f} MiB"
        # The server is still fine.
        async with httpx.AsyncClient(base_url=base) as http:
            assert (await http.get("/login")).status_code == 200
