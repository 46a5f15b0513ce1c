"""Everything a running VT.ai process shares: database, gate, ledger, callback, turn runner.

Built once per process at start-up (Chainlit's on_app_startup, the CLI, or a test). Metering
takes one of three paths (docs/supabase.md): a database URL (direct, preferred), else a
Supabase URL and service key (REST, `db` is None), else the embedded Postgres.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import litellm

from vtai import datadir
from vtai.cluster import layout as cluster_layout
from vtai.db import accounts
from vtai.db.accounts import LoginThrottle, Profile
from vtai.db.connection import Database
from vtai.llm import stream_end
from vtai.llm.catalogue import Catalogue
from vtai.metering.gate import Gate
from vtai.metering.journal import JournaledGate
from vtai.metering.ledger import Ledger
from vtai.metering.logger import CallNotes, MeteringLogger
from vtai.metering.plan_watch import PlanWatch
from vtai.metering.ports import Profiles, UsageGate
from vtai.metering.spool import Spool
from vtai.metering.turn import TurnRunner
from vtai.rest import login as supabase_login
from vtai.rest.login import SupabaseAuth
from vtai.rest.store import SupabaseStore
from vtai.settings import NEEDS_DATABASE, Settings

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    # None in REST mode: then `store` is the gate, the ledger's store and the profiles.
    db: Database | None
    gate: UsageGate
    ledger: Ledger
    runner: TurnRunner
    callback: MeteringLogger
    throttle: LoginThrottle
    store: SupabaseStore | None = None
    auth: SupabaseAuth | None = None

    @classmethod
    async def start(cls, settings: Settings, replay: bool = True, pool_size: int = 10) -> Services:
        db = store = auth = None
        # Whatever the mode, the spool and journal live here: private and ignored by git.
        datadir.ensure(settings.data_dir)
        if settings.rest_metering:
            store = await SupabaseStore.connect(
                settings.supabase_url,
                settings.supabase_service_key.get_secret_value(),
                settings.usage_period,
                settings.reservation_ttl,
                settings.gate_fail_mode,
            )
            gate = store
            ledger = Ledger(store, Spool(settings.spool_dir))
            log.warning(
                "metering over the Supabase REST API (no database URL); chat history, the "
                "/admin dashboard, balance sync and `vtai user` are off: each %s",
                NEEDS_DATABASE,
            )
        else:
            db = await Database(settings, pool_size=pool_size).open()
            gate = Gate(
                db.gate_pool,
                settings.usage_period,
                settings.reservation_ttl,
                settings.gate_fail_mode,
            )
            ledger = Ledger(db.pool, Spool(settings.spool_dir), settings.usage_period)
        # Grants go in the journal: a killed process's reservations are released at recovery
        # (its own restart, or a live sibling's: vtai.cluster.layout), not at their TTL.
        ledger.replayer.release = gate.release
        ledger.replayer.peers = lambda: cluster_layout.peer_journals(settings.process_dir)
        gate = JournaledGate(gate, ledger.spool, settings.reservation_ttl)
        if settings.supabase_auth:
            auth = await SupabaseAuth.connect(
                settings.supabase_url, settings.supabase_anon_key.get_secret_value()
            )
            log.info("password logins go to Supabase Auth (SUPABASE_ANON_KEY is set)")
        notes = CallNotes()
        callback = MeteringLogger(ledger, settings.log_content, notes)
        register_callback(callback)
        _register_local_model()
        stream_end.apply()
        # LiteLLM would fetch Llama's or Cohere's tokenizer from Hugging Face to count (on the
        # event loop, and retrying for ~23 s where the network is closed): cl100k instead.
        litellm.disable_hf_tokenizer_download = True
        if replay:
            await ledger.replayer.recover()
            ledger.replayer.start()
        log.info(
            "usage gate fails %s when the database is down (VTAI_GATE_FAIL_MODE)",
            settings.gate_fail_mode,
        )
        catalogue = Catalogue(db.pool if db is not None else None)
        await catalogue.fresh()
        runner = TurnRunner(gate, ledger, notes, settings, catalogue=catalogue)
        if db is not None and settings.reserve_ahead:
            runner.plan_watch = await PlanWatch(db.url, runner.plans_changed).start()
        elif settings.reserve_ahead:
            log.info(
                "reserving ahead is off: it needs plan changes heard over a database connection"
                " (%s)",
                NEEDS_DATABASE,
            )
        return cls(settings, db, gate, ledger, runner, callback, LoginThrottle(), store, auth)

    async def authenticate(self, username: str, password: str) -> Profile | None:
        """The profile for a login form's name and password: Supabase Auth or local argon2.

        Behind the database's login throttle (vtai.web.sessions.throttled): per name and per
        client address, counted atomically, so parallel guesses queue.
        """
        from vtai.web import sessions

        return await sessions.throttled(self, username, password, self._check_password)

    async def _check_password(self, username: str, password: str) -> Profile | None:
        if self.auth is not None:
            profiles: Profiles = (
                self.store if self.store is not None else accounts.PoolProfiles(self.db.pool)
            )
            return await supabase_login.login(self.auth, profiles, username, password)
        return await accounts.authenticate(self.db.pool, username, password)

    async def flush(self, timeout: float = 30.0) -> None:
        """Wait for every pending ledger write: LiteLLM's queued hooks and the turn's own."""
        from litellm.litellm_core_utils.logging_worker import GLOBAL_LOGGING_WORKER

        # Answered streams finish in the background and only then queue their success hooks.
        await self.runner.drain()
        try:
            await asyncio.wait_for(GLOBAL_LOGGING_WORKER.flush(), timeout)
        except TimeoutError:
            log.error("LiteLLM's logging queue did not drain in %.0f s", timeout)
        await self.runner.drain()

    async def stop(self) -> None:
        if self.runner.plan_watch is not None:
            await self.runner.plan_watch.stop()
        await self.runner.release_ahead()
        # Rows of turns that already answered must not die with the process.
        await self.flush()
        await self.ledger.stop()
        unregister_callback(self.callback)
        if self.auth is not None:
            await self.auth.close()
        if self.store is not None:
            await self.store.close()
        if self.db is not None:
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
    from vtai.llm import local_model

    local_model.register()
