"""The quota line under an answer is what the ledger holds, through the real server.

`chainlit run vtai/main.py` is driven over socket.io (tests/chainlit_client.py) with the FAKE
provider (tests/fake_provider.py); `vtai usage NAME` is run as tests/test_cli.py runs it.
"""

from __future__ import annotations

import asyncio
import io
import re
import sys

import pytest

# The real server with the FAKE provider, as the meter's attack tests run it.
from tests.test_meter_attacks import app, listener, provider  # noqa: F401
from vtai import cli

pytestmark = [pytest.mark.browser, pytest.mark.slow]

LINE = re.compile(r"\n---\n\*(.+)\*\s*$")


async def vtai_usage(monkeypatch, capsys, db_url: str, data_dir, name: str) -> str:
    monkeypatch.setenv("VTAI_DATABASE_URL", db_url)
    monkeypatch.setenv("VTAI_DATA_DIR", str(data_dir))
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    capsys.readouterr()
    code = await asyncio.to_thread(cli.main, ["usage", name])
    out, _ = capsys.readouterr()
    assert code == 0, out
    return out.strip()


async def test_the_line_after_two_quick_turns_is_what_the_ledger_holds(
    app,  # noqa: F811
    monkeypatch,
    capsys,
    tmp_path,
):
    user = await app.user()
    lines = []
    async with await app.chat(user) as client:
        # The second message leaves the moment the first answer ends: its reservation (made
        # ahead, right after that answer) was read before the first turn's row settled.
        for text in ("What is a token?", "And a quota?"):
            reply = await client.send(text)
            found = LINE.search(reply.answer["output"])
            assert found, reply.answer["output"]
            lines.append(found.group(1))
    usage = await vtai_usage(monkeypatch, capsys, app.db_url, tmp_path, user.username)
    assert usage == f"{user.username}: {lines[-1]}"
    # Both turns are in it: the line under the first answer showed less.
    assert lines[0] != lines[1]
