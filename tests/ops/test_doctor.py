"""`vtai doctor` as an operator runs it: a subprocess against a real database, the real local
model and LiteLLM path, and a STAND-IN for the providers' key endpoints and a webhook receiver
(StandInProviderAndReceiver below), which can't be reached from here."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
from aiohttp import web

from tests.background_server import BackgroundServer
from tests.conftest import ROOT
from vtai.ops import probe

GOOD_KEY = "sk-stand-in-good"


class StandInProviderAndReceiver(BackgroundServer):
    """A STAND-IN on 127.0.0.1, for tests only: OpenAI's GET /v1/models (200 for GOOD_KEY, 401
    for any other key) and a webhook receiver that takes only POST (so HEAD gets 405)."""

    def build_app(self) -> web.Application:
        async def models(request: web.Request) -> web.Response:
            if request.headers.get("Authorization") != f"Bearer {GOOD_KEY}":
                return web.json_response({"error": {"message": "bad key"}}, status=401)
            return web.json_response({"object": "list", "data": []})

        async def hook(request: web.Request) -> web.Response:
            return web.Response(status=204)

        app = web.Application()
        app.router.add_get("/openai/v1/models", models, allow_head=False)
        app.router.add_post("/hook", hook)
        return app


@pytest.fixture(scope="module")
def stand_in():
    server = StandInProviderAndReceiver().start()
    yield server
    server.stop()


async def doctor(db_url: str, tmp_path, **env: str) -> tuple[int, str]:
    """Run `vtai doctor` in a clean environment (no .env: the working directory is tmp_path)."""
    ours = ("VTAI_", "SUPABASE_", "OPENAI_", "ANTHROPIC_", "GEMINI_", "OPENROUTER_")
    base = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    base.update(
        PYTHONPATH=str(ROOT),
        VTAI_DATABASE_URL=db_url,
        VTAI_DATA_DIR=str(tmp_path / "data"),
        VTAI_MODEL="local/smollm2-135m",
    )
    base.update(env)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vtai.cli",
        "doctor",
        cwd=tmp_path,
        env=base,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode, out.decode() + err.decode()[-2000:]


def line(output: str, name: str) -> str:
    """The line of check `name` (after its 5-column mark and a space)."""
    found = [x for x in output.splitlines() if x[6:].startswith(f"{name}: ")]
    assert len(found) == 1, output
    return found[0]


@pytest.mark.slow  # a subprocess that loads LiteLLM and the local model
async def test_doctor_passes_on_a_healthy_database_with_a_settled_probe_turn(
    db_url, conn, tmp_path, stand_in
):
    code, out = await doctor(
        db_url,
        tmp_path,
        OPENAI_API_KEY=GOOD_KEY,
        OPENAI_API_BASE=stand_in.url("openai/v1"),
        VTAI_WEBHOOK_URLS=stand_in.url("hook"),
        VTAI_WEBHOOK_SECRET="doctor-test-secret",
    )
    assert code == 0, out
    for name in ("database", "migrations", "rls", "clock", "callback", "probe", "spool"):
        assert line(out, name).startswith("ok "), out
    assert line(out, "OPENAI_API_KEY").startswith("ok "), out
    assert line(out, f"webhook http://127.0.0.1:{stand_in.port}") == (
        f"ok    webhook http://127.0.0.1:{stand_in.port}: reachable (HTTP 405 to HEAD)"
    )

    # The probe's row: the callback's, marked, settled; counters and aggregates equal the ledger.
    rows = await conn.fetch(
        "select source, status, total_tokens, additional_details from request_logs"
        " where end_user = $1",
        probe.PROBE_USER_ID,
    )
    assert [(r["source"], r["status"]) for r in rows] == [("probe", "success")]
    assert rows[0]["total_tokens"] > 0 and "provisional" not in rows[0]["additional_details"]
    assert await conn.fetch("select * from reservations") == []
    assert await conn.fetch("select * from vtai_verify_counters()") == []
    assert await conn.fetch("select * from vtai_verify_aggregates()") == []
    user = await conn.fetchrow(
        "select username, tier, disabled_at is not null as disabled,"
        " exists (select 1 from vtai_private.credentials where profile_id = p.id) as password"
        " from profiles p where id = $1",
        probe.PROBE_USER_ID,
    )
    assert dict(user) == {
        "username": "vtai-probe",
        "tier": "unlimited",
        "disabled": True,
        "password": False,
    }


@pytest.mark.slow  # a subprocess that loads LiteLLM and the local model
async def test_doctor_fails_on_a_broken_rls_policy_a_refused_key_and_a_dead_webhook(
    db_url, conn, tmp_path, stand_in
):
    await conn.execute(
        'create policy "leak" on public.request_logs for select to anon using (true);'
        " grant select on public.request_logs to anon;"
        " alter table public.models disable row level security;"
        # No local model offered: the probe says skip, and this run loads no model.
        " update public.models set enabled = false where model = 'local/smollm2-135m';"
    )
    code, out = await doctor(
        db_url,
        tmp_path,
        OPENAI_API_KEY="sk-refused",
        OPENAI_API_BASE=stand_in.url("openai/v1"),
        VTAI_WEBHOOK_URLS="http://127.0.0.1:1/hook",
        VTAI_MODEL="gpt-4o-mini",
        VTAI_WEBHOOK_SECRET="doctor-test-secret",
    )
    assert code == 1, out
    rls = line(out, "rls")
    assert rls.startswith("FAIL ")
    assert "row-level security is off on public.models" in rls
    assert 'policy "leak" on public.request_logs lets anon select' in rls
    assert "anon may select public.request_logs" in rls
    assert "OPENAI_API_KEY was refused" in line(out, "OPENAI_API_KEY")
    assert line(out, "webhook http://127.0.0.1:1").startswith("FAIL ")
    # What is not broken still says so.
    assert line(out, "callback").startswith("ok "), out
    assert line(out, "probe") == (
        "skip  probe: local/smollm2-135m is not offered here:"
        " `vtai model enable local/smollm2-135m` to probe"
    )
    assert "vtai doctor: 3 of " in out
