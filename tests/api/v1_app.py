"""The app behind the /v1 tests: one real `chainlit run vtai/main.py` for the package (its
fixture is in conftest.py), its Postgres reached through a proxy a test can cut, and the model
a FAKE OpenAI-compatible provider (tests/fake_provider.py) that prices nothing itself: the
catalogue gives `openai/fake` a price, so a dollar cap can bind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import openai

from tests.metered_app import MeteredApp
from vtai.api import keys

MODEL = "openai/fake"
MAX_TOKENS = 40
# USD per token of openai/fake, prompt and completion (the catalogue's, so both the reserve
# and the settle price it).
PRICE = 0.00001
HELLO = [{"role": "user", "content": "Say hello"}]
ROOT = Path(__file__).resolve().parents[2]


class App(MeteredApp):
    def __init__(self, base: str, db_url: str, data_dir: Path, proxy):
        super().__init__(base, db_url)
        self.data_dir = data_dir
        self.proxy = proxy

    @property
    def log(self) -> str:
        """The server's log file so far (its stdout and stderr)."""
        return (self.data_dir / "app.log").read_text(errors="replace")

    async def user_with_key(self, **plan):
        """A user on a tier of their own, and a key of theirs."""
        user, _ = await self.user_on_plan(**plan)
        conn = await asyncpg.connect(self.db_url)
        try:
            _, plain = await keys.create(conn, user.id, "test key", actor="test")
        finally:
            await conn.close()
        return user, plain

    async def key_id(self, plain: str):
        """The id of the key whose hash is that of `plain`."""
        (row,) = await self.sql("select id from api_keys where key_hash = $1", keys.hash_key(plain))
        return row["id"]

    def client(self, key: str, **kw) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.base}/v1", api_key=key, **kw)

    def vtai(self, *argv: str, data_dir: Path) -> subprocess.CompletedProcess:
        """The real `vtai` command against this app's database, as an operator runs it."""
        exe = ROOT / ".venv" / "bin" / "vtai"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "vtai.cli"]
        env = dict(os.environ, VTAI_DATABASE_URL=self.db_url, VTAI_DATA_DIR=str(data_dir))
        return subprocess.run(
            [*cmd, *argv], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT
        )
