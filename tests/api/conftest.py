"""One running app for the /v1 tests of this package (tests/api/v1_app.py)."""

from __future__ import annotations

import asyncpg
import pytest

from tests.api.pg_proxy import PgProxy
from tests.api.v1_app import MAX_TOKENS, MODEL, PRICE, App
from tests.browser import running_app
from tests.conftest import create_database, drop_database
from tests.fake_provider import FakeProvider


@pytest.fixture(scope="package")
def provider():
    p = FakeProvider().start()
    yield p
    p.stop()


@pytest.fixture(scope="package")
async def app(pg_server, template_db, tmp_path_factory, provider):
    url = await create_database(pg_server, template_db)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "insert into models (model, price_in, price_out, position) values ($1, $2, $2, 0)",
            MODEL,
            PRICE,
        )
    finally:
        await conn.close()
    proxy = PgProxy(url).start()
    api_base = provider.url("script")
    env = {
        "VTAI_MODEL": MODEL,
        "OPENAI_API_BASE": api_base,
        "OPENAI_BASE_URL": api_base,
        "OPENAI_API_KEY": "sk-test-not-a-real-key",
        "VTAI_MAX_TOKENS": str(MAX_TOKENS),
        "VTAI_REQUEST_TIMEOUT": "30",
        "VTAI_MAX_BODY_BYTES": "65536",
        "VTAI_MAX_MESSAGE_CHARS": "5000",
        "VTAI_GATE_FAIL_MODE": "closed",
    }
    data_dir = tmp_path_factory.mktemp("api")
    try:
        async with running_app(proxy.url, data_dir, **env) as base:
            yield App(base, url, data_dir, proxy)
    finally:
        proxy.stop()
        await drop_database(pg_server, url)
