"""Readiness checks against a real database: migrations, the spool, the local model, and the
REST-only mode's database check through the PostgREST stand-in."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from tests.fake_postgrest import FakePostgrest, token
from vtai.llm import local_model
from vtai.metering.spool import Spool
from vtai.ops import health, metrics
from vtai.rest.store import SupabaseStore


@pytest.fixture(autouse=True)
def _no_cached_answer(monkeypatch):
    monkeypatch.setattr(health, "_migrations_ok_until", 0.0)


def states(checks: dict) -> dict[str, str]:
    return {name: c.state for name, c in checks.items()}


async def test_ready_on_a_migrated_database_once_the_local_model_is_loaded(services, monkeypatch):
    monkeypatch.setattr(local_model, "_server", None)
    checks = await health.readiness(services)
    assert states(checks) == {
        "database": "ok",
        "migrations": "ok",
        "spool": "ok",
        "local_model": "fail",
    }
    assert health.report(checks)[0] is False
    monkeypatch.setattr(local_model, "_server", object())
    ready, body = health.report(await health.readiness(services))
    assert ready and body["status"] == "ok"
    assert body["checks"]["local_model"] == {"state": "ok", "detail": "local/smollm2-135m loaded"}


async def test_a_pending_migration_or_stale_function_file_is_named(services, conn):
    last = await conn.fetchval("select max(version) from supabase_migrations.schema_migrations")
    await conn.execute("delete from supabase_migrations.schema_migrations where version = $1", last)
    check = await health.migrations_current(services)
    assert check.state == "fail" and "1 pending" in check.detail and last in check.detail
    await conn.execute(
        "insert into supabase_migrations.schema_migrations (version) values ($1)", last
    )
    name = await conn.fetchval("select min(name) from supabase_migrations.vtai_function_files")
    await conn.execute(
        "update supabase_migrations.vtai_function_files set sha256 = 'x' where name = $1", name
    )
    check = await health.migrations_current(services)
    assert check.state == "fail" and name in check.detail


def spool_row(age: float) -> dict:
    created = datetime.fromtimestamp(time.time() - age, UTC).isoformat()
    return {"litellm_call_id": str(uuid.uuid4()), "created_at": created}


async def test_a_spool_is_stuck_when_its_oldest_row_is_old(tmp_path):
    spool = Spool(tmp_path / "spool")
    services = SimpleNamespace(ledger=SimpleNamespace(spool=spool))
    assert (await health.spool(services)) == health.ok("empty")
    spool.append_many([spool_row(30), spool_row(5)])
    fresh = await health.spool(services)
    assert fresh.state == "ok" and fresh.detail.startswith("2 row(s) waiting, the oldest 30 s")
    # Rows are appended as their turns end: the first of a file is its oldest.
    spool = Spool(tmp_path / "stuck")
    services.ledger.spool = spool
    spool.append_many([spool_row(health.SPOOL_STUCK + 60), spool_row(1), spool_row(0)])
    stuck = await health.spool(services)
    assert stuck.state == "fail" and "vtai spool status" in stuck.detail

    await metrics.publish(spool)
    label = str(spool.directory)
    assert metrics.SPOOL_ROWS.labels(label)._value.get() == 3
    assert metrics.SPOOL_AGE.labels(label)._value.get() >= health.SPOOL_STUCK


async def test_rest_mode_asks_the_rest_api(db_url, tmp_path):
    rest = await FakePostgrest(db_url).start()
    store = await SupabaseStore.connect(rest.url, token("service_role"))
    services = SimpleNamespace(
        db=None,
        store=store,
        settings=SimpleNamespace(model="gpt-4o-mini"),
        ledger=SimpleNamespace(spool=Spool(tmp_path / "spool")),
    )
    try:
        checks = await health.readiness(services)
        assert states(checks) == {
            "database": "ok",
            "migrations": "skip",
            "spool": "ok",
            "local_model": "skip",
        }
        await rest.stop()
        down = await health.readiness(services)
        assert down["database"].state == "fail" and health.report(down)[0] is False
    finally:
        await store.close()
        await rest.stop()


def test_liveness_asks_nothing():
    assert health.report(health.liveness(None))[0] is False
    alive = health.liveness(SimpleNamespace(db=object()))
    assert states(alive) == {"process": "ok", "services": "ok"}


@pytest.mark.slow
async def test_on_the_embedded_server_the_migrations_are_read_as_its_superuser(tmp_path):
    """The app's own role (vtai_app) may not read the migration records."""
    from tests.conftest import make_settings
    from vtai.services import Services

    s = await Services.start(make_settings(None, tmp_path, model="gpt-4o-mini"), replay=False)
    try:
        assert s.db.admin_url != s.db.url
        assert states(await health.readiness(s)) == {
            "database": "ok",
            "migrations": "ok",
            "spool": "ok",
            "local_model": "skip",
        }
    finally:
        await s.stop()
