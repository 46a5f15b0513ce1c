"""Everything a running VT.ai process shares: database, gate, ledger, callback, turn runner.

Built once per process at start-up (Chainlit's on_app_startup, the CLI, or a test).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import litellm

from vtai.callback import CallNotes, MeteringLogger
from vtai.db import Database
from vtai.gate import Gate
from vtai.ledger import Ledger
from vtai.settings import Settings
from vtai.spool import Spool
from vtai.turn import TurnRunner
from vtai.users import LoginThrottle

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    db: Database
    gate: Gate
    ledger: Ledger
    runner: TurnRunner
    callback: MeteringLogger
    throttle: LoginThrottle

    @classmethod
    async def start(cls, settings: Settings, replay: bool = True, pool_size: int = 10) -> Services:
        db = await Database(settings, pool_size=pool_size).open()
        gate = Gate(
            db.pool, settings.usage_period, settings.reservation_ttl, settings.gate_fail_mode
        )
        ledger = Ledger(db.pool, Spool(settings.spool_dir), settings.usage_period)
        notes = CallNotes()
        callback = MeteringLogger(ledger, settings.log_content, notes)
        register_callback(callback)
        _register_local_model()
        if replay:
            await ledger.recover()
            ledger.start_replayer()
        log.info(
            "usage gate fails %s when the database is down (VTAI_GATE_FAIL_MODE)",
            settings.gate_fail_mode,
        )
        runner = TurnRunner(gate, ledger, notes, settings)
        return cls(settings, db, gate, ledger, runner, callback, LoginThrottle())

    async def flush(self, timeout: float = 30.0) -> None:
        """Wait for every pending ledger write: LiteLLM's queued hooks and the turn's own."""
        from litellm.litellm_core_utils.logging_worker import GLOBAL_LOGGING_WORKER

        try:
            await asyncio.wait_for(GLOBAL_LOGGING_WORKER.flush(), timeout)
        except TimeoutError:
            log.error("LiteLLM's logging queue did not drain in %.0f s", timeout)
        await self.runner.drain()

    async def stop(self) -> None:
        # Rows of turns that already answered must not die with the process.
        await self.flush()
        await self.ledger.stop()
        unregister_callback(self.callback)
        await self.db.close()


def register_callback(callback: MeteringLogger) -> None:
    """One metering logger per process; LiteLLM copies callbacks into several lists."""
    for existing in list(litellm.logging_callback_manager.get_all_callbacks()):
        if isinstance(existing, MeteringLogger):
            unregister_callback(existing)
    litellm.callbacks.append(callback)
    litellm.suppress_debug_info = True


def unregister_callback(callback: MeteringLogger) -> None:
    litellm.logging_callback_manager.remove_callback_from_all_lists(callback)


def _register_local_model() -> None:
    from vtai import local_model

    local_model.register()
