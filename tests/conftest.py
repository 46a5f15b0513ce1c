"""Fixtures that build real things: a real Postgres, real databases, real services.

The server is the embedded PostgreSQL 18 by default, or the one at VTAI_TEST_DATABASE_URL
(CI also runs the suite against PostgreSQL 15 that way). Each test gets its own database,
cloned from a migrated template so a test starts in milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import asyncpg  # noqa: E402
import pytest  # noqa: E402

from vtai.db import accounts as users  # noqa: E402
from vtai.db import migrations
from vtai.services import Services  # noqa: E402
from vtai.settings import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
TEMPLATE = "vtai_test_template"


def pytest_collection_modifyitems(items):
    for item in items:
        if "pg_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.db)


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="session")
def pg_server():
    """URL of a Postgres server where the tests may create databases (as a superuser)."""
    url = os.environ.get("VTAI_TEST_DATABASE_URL")
    if url:
        yield url
        return
    with embedded_server() as server_url:
        yield server_url


@contextlib.contextmanager
def embedded_server(prefix: str = "vtai-test-pg-"):
    """A throwaway embedded Postgres (which checks passwords); yields its superuser URL."""
    from vtai.db import embedded as embedded_pg

    # Our own temp dir: pytest prunes old basetemp dirs, and a concurrent pytest run on the
    # same machine could delete the data dir out from under a live server.
    data_dir = Path(tempfile.mkdtemp(prefix=prefix))
    server = embedded_pg.start(data_dir)
    try:
        yield server.url
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


async def build_template(server_url: str, name: str = TEMPLATE) -> None:
    """A fully migrated database named `name`, for fast `create database ... template`."""
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'drop database if exists "{name}"')
        await admin.execute(f'create database "{name}"')
    finally:
        await admin.close()
    conn = await asyncpg.connect(with_database(server_url, name))
    try:
        await migrations.apply_pending(conn)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def template_db(pg_server):
    asyncio.run(build_template(pg_server))
    return TEMPLATE


async def create_database(server_url: str, template: str | None = None) -> str:
    name = f"vtai_t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_url)
    try:
        clause = f' template "{template}"' if template else ""
        await admin.execute(f'create database "{name}"{clause}')
    finally:
        await admin.close()
    return with_database(server_url, name)


async def drop_database(server_url: str, url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'drop database if exists "{name}" with (force)')
    finally:
        await admin.close()


@pytest.fixture
async def empty_db_url(pg_server):
    """A brand-new database with nothing in it."""
    url = await create_database(pg_server)
    yield url
    await drop_database(pg_server, url)


@pytest.fixture
async def db_url(pg_server, template_db):
    """A fresh, fully migrated database."""
    url = await create_database(pg_server, template_db)
    yield url
    await drop_database(pg_server, url)


def offering(settings: Settings, model: str) -> Settings:
    """`settings` for a server whose default model, and so the first it offers, is `model`:
    a turn runs only a model the server offers (vtai.metering.turn)."""
    return settings.model_copy(update={"model": model})


def make_settings(db_url: str, data_dir: Path, **overrides) -> Settings:
    values = dict(database_url=db_url, data_dir=data_dir, model="local/smollm2-135m")
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
async def services(db_url, tmp_path):
    s = await Services.start(make_settings(db_url, tmp_path), replay=False)
    yield s
    await s.stop()


@pytest.fixture
async def conn(db_url):
    c = await asyncpg.connect(db_url)
    yield c
    await c.close()


async def add_user(conn, name: str | None = None, tier: str = "free", admin: bool = False):
    return await users.create_user(
        conn, name or f"user{uuid.uuid4().hex[:8]}", "correct horse battery", tier, admin
    )
