"""The grace sweep (vtai.billing.grace) over the app's own services and a real database."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

from tests.billing.conftest import billing_settings
from tests.conftest import add_user, make_settings
from vtai.billing import grace
from vtai.services import Services

NOW = datetime.now(UTC)


async def failing(conn, user, sub, failed_at, tier="premium"):
    """A subscription whose payment first failed at `failed_at` (an invoice.payment_failed)."""
    await conn.fetchrow(
        "select * from vtai_billing_subscription($1, 'customer.subscription.created', $2, $3,"
        " 'cus_' || $4, $4, 'active', 'price_x', $5, $2, $2::timestamptz + interval '30 days',"
        " false, 7, '{}'::jsonb)",
        f"evt_{uuid.uuid4().hex}",
        failed_at,
        user.id,
        sub,
        tier,
    )
    await conn.fetchrow(
        "select * from vtai_billing_invoice($1, 'invoice.payment_failed', $2, 'cus_' || $3, $3,"
        " 7, '{}'::jsonb)",
        f"evt_{uuid.uuid4().hex}",
        failed_at,
        sub,
    )


async def test_grace_sweep_moves_only_users_past_grace(db_url, tmp_path, conn):
    services = await Services.start(billing_settings(db_url, tmp_path), replay=False)
    try:
        late = await add_user(conn)
        recent = await add_user(conn)
        await failing(conn, late, "sub_late", NOW - timedelta(days=8))
        await failing(conn, recent, "sub_recent", NOW - timedelta(days=6))
        tiers = "select tier from profiles where id = $1"
        # Events are applied at the time they arrive: the late one is already out of grace.
        assert await conn.fetchval(tiers, late.id) == "free"
        await conn.execute("update profiles set tier = 'premium' where id = $1", late.id)
        moved = await grace.sweep(services, services.settings, now=NOW)
        assert moved == [(late.id, "premium", "free")]
        assert await conn.fetchval(tiers, recent.id) == "premium"
        assert await grace.sweep(services, services.settings, now=NOW) == []
        later = NOW + timedelta(days=1, minutes=1)
        assert await grace.sweep(services, services.settings, now=later) == [
            (recent.id, "premium", "free")
        ]
    finally:
        await services.stop()


async def test_grace_sweep_does_nothing_with_billing_off(db_url, tmp_path, conn):
    services = await Services.start(make_settings(db_url, tmp_path), replay=False)
    try:
        user = await add_user(conn)
        await failing(conn, user, "sub_off", NOW - timedelta(days=3))
        later = NOW + timedelta(days=30)
        assert await grace.sweep(services, services.settings, now=later) == []
        await grace.sweep_forever(services, services.settings, every=0.01)  # returns at once
        assert await conn.fetchval("select tier from profiles where id = $1", user.id) == "premium"
    finally:
        await services.stop()


async def test_grace_sweep_forever_sweeps_at_once_and_survives_a_failure(
    db_url, tmp_path, conn, monkeypatch
):
    services = await Services.start(billing_settings(db_url, tmp_path), replay=False)
    calls: list[datetime] = []
    done = asyncio.Event()
    real = grace.sweep

    async def flaky(svc, settings, now=None):
        calls.append(datetime.now(UTC))
        if len(calls) == 1:
            raise OSError("database unreachable")
        result = await real(svc, settings, now)
        done.set()
        return result

    monkeypatch.setattr(grace, "sweep", flaky)
    user = await add_user(conn)
    await failing(conn, user, "sub_forever", NOW - timedelta(days=3))
    await conn.execute(
        "update billing_subscriptions set payment_failed_at = $1", NOW - timedelta(days=8)
    )
    task = asyncio.create_task(grace.sweep_forever(services, services.settings, every=0.01))
    try:
        async with asyncio.timeout(10):
            await done.wait()
        assert await conn.fetchval("select tier from profiles where id = $1", user.id) == "free"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await services.stop()
    assert task.cancelled()
