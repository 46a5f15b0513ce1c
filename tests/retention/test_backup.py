"""`vtai backup` and `vtai restore` on an embedded database of their own: a round trip."""

from __future__ import annotations

import pytest

from tests.conftest import add_user
from vtai.db.connection import Database
from vtai.retention import backup
from vtai.settings import Settings


@pytest.mark.slow  # creates and starts an embedded PostgreSQL cluster of its own
async def test_backup_restore_round_trip(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", model="local/smollm2-135m")
    assert settings.embedded
    db = await Database(settings, pool_size=1).open()
    try:
        async with db.pool.acquire() as conn:
            await add_user(conn, "kept")
    finally:
        await db.close()  # this test started the server: it stops it
    dump = tmp_path / "vtai.dump"
    assert await backup.backup(settings, dump, lambda _: None) > 0

    db = await Database(settings, pool_size=1).open()
    try:
        async with db.pool.acquire() as conn:
            await add_user(conn, "after")
        # The app is "running" (this pool): restore refuses.
        with pytest.raises(backup.BackupError, match="other connection"):
            await backup.restore(settings, dump, force=True, say=lambda _: None)
    finally:
        await db.close()
    with pytest.raises(backup.BackupError, match="--force"):
        await backup.restore(settings, dump, say=lambda _: None)
    await backup.restore(settings, dump, force=True, say=lambda _: None)

    db = await Database(settings, pool_size=1).open()
    try:
        names = {r[0] for r in await db.pool.fetch("select username from profiles")}
        assert names == {"kept"}
        assert await db.pool.fetch("select * from vtai_verify_counters()") == []
    finally:
        await db.close()
