"""The `vtai` command against a real database: users, tiers, usage, spool; one-line errors."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import uuid

import pytest

from vtai import cli
from vtai.metering.spool import Spool


@pytest.fixture
def run(db_url, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VTAI_DATABASE_URL", db_url)
    monkeypatch.setenv("VTAI_DATA_DIR", str(tmp_path))

    async def invoke(*argv, stdin=""):
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = await asyncio.to_thread(cli.main, list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


async def test_user_lifecycle(run):
    assert (
        await run("user", "add", "ada", "--tier", "basic", "--password-stdin", stdin="pw-123\n")
    )[0] == 0
    code, out, _ = await run("user", "list")
    assert code == 0 and "ada" in out and "basic" in out
    code, out, _ = await run("user", "tier", "ada", "premium")
    assert code == 0 and "premium" in out
    code, out, _ = await run("usage", "ada")
    assert code == 0 and "0 / 500,000 tokens used" in out and "resets" in out
    code, out, _ = await run("usage", "--verify")
    assert code == 0 and out.startswith("ok: usage counters and aggregates")


@pytest.mark.parametrize(
    ("argv", "stdin", "expected"),
    [
        (("user", "tier", "nobody", "free"), "", "no user named 'nobody'"),
        (("user", "add", "eve", "--tier", "gold", "--password-stdin"), "pw\n", "unknown tier"),
        (("user", "add", "eve", "--password-stdin"), "\n", "the password is empty"),
        (("user", "add", "eve"), "", "--password-stdin"),
        (("usage", "nobody"), "", "no user named 'nobody'"),
    ],
)
async def test_bad_input_is_one_line_and_nonzero(run, argv, stdin, expected):
    code, out, err = await run(*argv, stdin=stdin)
    assert code != 0 and expected in err
    assert err.count("\n") == 1 and "Traceback" not in err


async def test_duplicate_user_is_refused(run):
    await run("user", "add", "bo", "--password-stdin", stdin="x\n")
    code, _, err = await run("user", "add", "bo", "--password-stdin", stdin="y\n")
    assert code == 2 and "already exists" in err


async def test_spool_status_and_replay(run, tmp_path, conn):
    from tests.conftest import add_user

    user = await add_user(conn)
    Spool(tmp_path / "spool").append(
        {
            "litellm_call_id": str(uuid.uuid4()),
            "end_user": str(user.id),
            "status": "success",
            "prompt_tokens": 3,
            "completion_tokens": 4,
        }
    )
    code, out, _ = await run("spool", "status")
    assert code == 0 and out.startswith("1 row(s) waiting")
    code, out, _ = await run("spool", "replay")
    assert code == 0 and "replayed 1 row(s)" in out
    assert await conn.fetchval("select total_tokens from request_logs") == 7


def test_unreachable_database_is_one_clear_line(tmp_path):
    env = dict(
        os.environ,
        VTAI_DATABASE_URL="postgresql://u:s3cret@127.0.0.1:1/db",
        VTAI_DATA_DIR=str(tmp_path),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "vtai.cli", "user", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("vtai: cannot reach the database at 127.0.0.1")
    assert "s3cret" not in proc.stderr and "Traceback" not in proc.stderr


async def test_logout_disable_enable_and_password_end_logins(run, db_url):
    import asyncpg

    assert (await run("user", "add", "lou", "--password-stdin", stdin="pw-123\n"))[0] == 0
    conn = await asyncpg.connect(db_url)
    try:
        user_id = await conn.fetchval("select id from profiles where username = 'lou'")

        async def start() -> None:
            assert await conn.fetchval("select public.vtai_session_start($1, 3600)", user_id)

        async def live() -> int:
            return await conn.fetchval(
                "select count(*) from vtai_private.login_sessions"
                " where user_id = $1 and revoked_at is null",
                user_id,
            )

        await start()
        await start()
        code, out, _ = await run("user", "logout", "lou")
        assert code == 0 and "2 logins ended" in out and await live() == 0
        await start()
        code, out, _ = await run("user", "password", "lou", "--password-stdin", stdin="pw-456\n")
        assert code == 0 and "1 login ended" in out and await live() == 0
        await start()
        code, out, _ = await run("user", "disable", "lou")
        assert code == 0 and "disabled" in out and await live() == 0
        assert await conn.fetchval("select public.vtai_session_start($1, 3600)", user_id) is None
        code, out, _ = await run("user", "list")
        assert "disabled" in out
        assert (await run("user", "enable", "lou"))[0] == 0
        await start()
        code, _, err = await run("user", "logout", "nobody")
        assert code != 0 and "no user named 'nobody'" in err
    finally:
        await conn.close()


async def test_model_catalogue_add_list_disable_weight(run, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("MINE_KEY", "sk-mine")
    code, out, _ = await run(
        "model",
        "add",
        "openai/mine",
        "--display",
        "Mine",
        "--api-base",
        "http://127.0.0.1:9/v1",
        "--api-key-env",
        "MINE_KEY",
        "--price-in",
        "0.000001",
        "--price-out",
        "0.000002",
        "--weight",
        "2.5",
    )
    assert code == 0 and out.startswith("added openai/mine at http://127.0.0.1:9/v1 (offered)")
    code, out, _ = await run("model", "list")
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert code == 0 and "status" in out.splitlines()[0]
    assert "unavailable: OPENAI_API_KEY is not set" in lines["gpt-4o"]
    assert lines["openai/mine"].endswith("available") and "2.5" in lines["openai/mine"]
    assert "1e-06" in lines["openai/mine"] and lines["local/smollm2-135m"].endswith("available")
    assert list(lines)[-1] == "openai/mine"  # appended to the picker's order

    assert (await run("model", "disable", "openai/mine"))[0] == 0
    _, out, _ = await run("model", "list")
    assert "unavailable: disabled" in out
    assert (await run("model", "enable", "openai/mine"))[0] == 0

    code, out, err = await run("model", "weight", "openrouter/*", "0")
    assert code == 0 and err == ""
    assert out.splitlines() == [
        "openrouter/meta-llama/llama-3.3-70b-instruct: weight 0",
        "openrouter/openai/gpt-4o-mini: weight 0",
    ]
    code, out, err = await run("model", "weight", "nothing-*", "3")
    assert code == 0 and out == "" and err == "vtai: warning: no model matches 'nothing-*'\n"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("model", "add", "not a model at all"), "NAME: "),
        (("model", "add", "gpt-4o"), "NAME: 'gpt-4o' is already in the catalogue"),
        (("model", "add", "openai/x", "--api-base", "ftp://h"), "--api-base: "),
        (("model", "add", "openai/x", "--api-base", "http://h/v1"), "--api-key-env: required"),
        (
            ("model", "add", "openai/x", "--api-base", "http://h", "--api-key-env", "sk-abc"),
            "--api-key-env: 'sk-abc' is not a variable name",
        ),
        (("model", "add", "openai/x", "--price-in", "-1"), "--price-in: must be a non-negative"),
        (("model", "add", "openai/x", "--price-out", "cheap"), "--price-out: must be"),
        (("model", "add", "openai/x", "--weight", "nan"), "--weight: must be a non-negative"),
        (("model", "weight", "gpt-*", "-2"), "WEIGHT: must be a non-negative number"),
        (("model", "weight", "gpt-*", "inf"), "WEIGHT: must be a non-negative number"),
        (("model", "disable", "nope/nothing"), "NAME: no model 'nope/nothing'"),
    ],
)
async def test_model_bad_input_is_one_line_naming_the_field(run, argv, expected):
    code, out, err = await run(*argv)
    assert code == 2 and err.startswith("vtai: ") and expected in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


# --- Plans: `vtai tier show/set`, weights, and the audit trail of every CLI change ----------


async def audit_rows(db_url) -> list[tuple]:
    import json

    import asyncpg

    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch(
            "select actor, action, target, before::text as b, after::text as a"
            " from audit_log order by id"
        )
    finally:
        await conn.close()
    return [
        (
            r["actor"],
            r["action"],
            r["target"],
            json.loads(r["b"]) if r["b"] else None,
            json.loads(r["a"]) if r["a"] else None,
        )
        for r in rows
    ]


def table(out: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in out.splitlines()[1:]}


async def test_tier_show_and_set(run, db_url):
    import getpass

    code, out, err = await run("tier", "show")
    assert code == 0 and err == ""
    assert out.splitlines()[0].split() == [
        "tier",
        "tokens/month",
        "daily",
        "usd/month",
        "rpm",
        "models",
    ]
    assert table(out) == {
        "free": ["free", "10000", "-", "-", "-", "*"],
        "basic": ["basic", "100000", "-", "-", "-", "*"],
        "premium": ["premium", "500000", "-", "-", "-", "*"],
        "unlimited": ["unlimited", "-", "-", "-", "-", "*"],
    }

    code, out, err = await run(
        "tier",
        "set",
        "free",
        "--tokens",
        "20000",
        "--daily",
        "2000",
        "--usd",
        "1.50",
        "--rpm",
        "10",
        "--models",
        "local/*,gpt-4o-mini",
    )
    assert code == 0 and err == ""
    assert out.splitlines() == [
        "free: tokens 10000 -> 20000",
        "free: daily - -> 2000",
        "free: usd - -> 1.50",
        "free: rpm - -> 10",
        "free: models * -> local/*,gpt-4o-mini",
    ]
    _, out, _ = await run("tier", "show")
    assert table(out)["free"] == ["free", "20000", "2000", "1.50", "10", "local/*,gpt-4o-mini"]

    # `none` clears a cap; the same values again change nothing.
    code, out, _ = await run("tier", "set", "free", "--daily", "none", "--rpm", "NONE")
    assert code == 0 and out.splitlines() == ["free: daily 2000 -> -", "free: rpm 10 -> -"]
    code, out, _ = await run("tier", "set", "free", "--tokens", "20000")
    assert code == 0 and out == "free: no change\n"

    me = f"cli:{getpass.getuser()}"
    assert await audit_rows(db_url) == [
        (
            me,
            "tier.set",
            "free",
            {
                "token_limit": 10000,
                "daily_limit": None,
                "usd_limit": None,
                "rpm": None,
                "models": ["*"],
            },
            {
                "token_limit": 20000,
                "daily_limit": 2000,
                "usd_limit": "1.50",
                "rpm": 10,
                "models": ["local/*", "gpt-4o-mini"],
            },
        ),
        (
            me,
            "tier.set",
            "free",
            {"daily_limit": 2000, "rpm": 10},
            {"daily_limit": None, "rpm": None},
        ),
    ]


async def test_tier_set_warns_of_a_pattern_matching_no_model(run, db_url):
    code, out, err = await run("tier", "set", "basic", "--models", "local/*,nothing/*")
    assert code == 0 and out == "basic: models * -> local/*,nothing/*\n"
    assert err == (
        "vtai: warning: --models: 'nothing/*' matches no model in the catalogue (vtai model list)\n"
    )


async def test_tier_set_warns_when_a_variable_will_put_the_limit_back(run, monkeypatch):
    monkeypatch.setenv("VTAI_LIMIT_FREE", "15000")
    code, out, err = await run("tier", "set", "free", "--tokens", "20000")
    assert code == 0 and out == "free: tokens 15000 -> 20000\n"
    assert "vtai: warning: VTAI_LIMIT_FREE=15000 is set: the next start-up puts" in err
    _, out, _ = await run("tier", "show")
    # this command's own start-up put it back
    assert table(out)["free"][1] == "15000" and "VTAI_LIMIT_FREE=15000 sets" in out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("tier", "set", "free", "--daily", "-5"), "--daily: -5 is negative"),
        (("tier", "set", "free", "--tokens", "-1"), "--tokens: -1 is negative"),
        (("tier", "set", "free", "--usd", "-0.5"), "--usd: -0.5 is negative"),
        (("tier", "set", "free", "--usd", "lots"), "--usd: 'lots' is not an amount"),
        (("tier", "set", "free", "--rpm", "ten"), "--rpm: 'ten' is not a whole number"),
        (("tier", "set", "free", "--models", ""), "--models: name at least one model"),
        (("tier", "set", "gold", "--rpm", "1"), "TIER: unknown tier 'gold': choose one of"),
        (("tier", "set", "free"), "TIER: say what to change"),
        (("model", "weight", "gpt-4o", "ten"), "WEIGHT: must be a non-negative number"),
        (("model", "weight", "gpt-4o", "2000000"), "WEIGHT: must be a non-negative number up to"),
        (("model", "weight", "gpt 4o", "2"), "PATTERN: 'gpt 4o' has a space"),
    ],
)
async def test_plan_bad_input_is_one_line_naming_the_field(run, db_url, argv, expected):
    code, out, err = await run(*argv)
    assert code == 2 and err.startswith("vtai: ") and expected in err, err
    assert err.count("\n") == 1 and "Traceback" not in err and out == ""
    assert await audit_rows(db_url) == []
    _, out, _ = await run("tier", "show")
    assert table(out)["free"] == ["free", "10000", "-", "-", "-", "*"]


async def test_every_cli_change_is_audited_as_the_os_user(run, db_url, monkeypatch):
    import getpass

    monkeypatch.setenv("MINE_KEY", "sk-mine")
    me = f"cli:{getpass.getuser()}"
    await run("user", "add", "ada", "--password-stdin", stdin="pw-123\n")
    assert (await run("user", "tier", "ada", "premium"))[0] == 0
    assert (await run("user", "tier", "ada", "premium"))[0] == 0  # no change, no row
    argv = ("model", "add", "openai/mine", "--api-base", "http://127.0.0.1:9/v1")
    assert (await run(*argv, "--api-key-env", "MINE_KEY", "--weight", "2"))[0] == 0
    assert (await run("model", "disable", "gpt-4o"))[0] == 0
    code, out, _ = await run("model", "disable", "gpt-4o")
    assert code == 0 and "(it already was)" in out
    assert (await run("model", "enable", "gpt-4o"))[0] == 0
    assert (await run("model", "weight", "gpt-4o", "10"))[0] == 0
    assert (await run("model", "weight", "gpt-4o", "12.5"))[0] == 0
    assert (await run("model", "weight", "gpt-4o", "12.5"))[0] == 0  # no change, no row

    rows = await audit_rows(db_url)
    assert {r[0] for r in rows} == {me}
    assert [(r[1], r[2], r[3], r[4]) for r in rows if r[1] != "model.add"] == [
        ("user.tier", "ada", {"tier": "free"}, {"tier": "premium"}),
        ("model.disable", "gpt-4o", {"enabled": True}, {"enabled": False}),
        ("model.enable", "gpt-4o", {"enabled": False}, {"enabled": True}),
        ("model.weight", "gpt-4o", None, {"weight": 10.0}),
        ("model.weight", "gpt-4o", {"weight": 10.0}, {"weight": 12.5}),
    ]
    added = next(r for r in rows if r[1] == "model.add")
    assert added[2] == "openai/mine" and added[3] is None
    assert added[4]["api_base"] == "http://127.0.0.1:9/v1" and added[4]["weight"] == 2.0
    assert added[4]["api_key_env"] == "MINE_KEY" and "sk-mine" not in str(added)


# --- vtai key ---------------------------------------------------------------------------------


async def test_key_create_list_revoke(run, db_url):
    import asyncpg

    from vtai.api import keys

    await run("user", "add", "ada", "--password-stdin", stdin="pw-123\n")
    code, out, err = await run("key", "create", "ada", "--label", "laptop", "--expires-days", "7")
    assert code == 0, err
    plain = out.strip()
    assert keys.well_formed(plain) and out.count("\n") == 1  # the key alone on stdout
    assert "shown once" in err and "can't be shown again" in err and plain not in err
    assert f"created key {plain[:12]} 'laptop' for ada" in err
    code, _, err = await run("key", "create", "ada", "--label", "ci")
    assert code == 0 and "expires never" in err
    await run("user", "add", "bob", "--password-stdin", stdin="pw-123\n")
    assert (await run("key", "create", "bob", "--label", "bob's"))[0] == 0

    code, out, _ = await run("key", "list", "ada")
    assert code == 0 and "laptop" in out and "ci" in out and "bob's" not in out
    assert plain not in out and plain[5:] not in out and plain[:12] in out
    code, out, _ = await run("key", "list")
    assert code == 0 and "bob's" in out and out.count("active") == 3

    conn = await asyncpg.connect(db_url)
    try:
        key_id = await conn.fetchval("select id from api_keys where label = 'laptop'")
        code, out, _ = await run("key", "revoke", str(key_id))
        assert code == 0 and out.strip() == f"key {plain[:12]} 'laptop' of ada is revoked"
        code, out, _ = await run("key", "revoke", str(key_id))
        assert code == 0 and "(it already was)" in out
        assert await conn.fetchval("select revoked_at from api_keys where id = $1", key_id)
        code, out, _ = await run("key", "list", "ada")
        assert "revoked" in out
        rows = await conn.fetch("select actor, action from audit_log order by id")
        assert [r["action"] for r in rows] == ["key.create"] * 3 + ["key.revoke"]
        assert {r["actor"] for r in rows} == {audit_actor()}
    finally:
        await conn.close()


def audit_actor() -> str:
    from vtai.plans import audit

    return audit.cli_actor()


async def test_key_list_empty(run):
    code, out, _ = await run("key", "list")
    assert code == 0 and "no API keys yet" in out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("key", "create", "nobody", "--label", "x"), "no user named 'nobody'"),
        (("key", "create", "ada", "--label", " "), "--label: "),
        (("key", "create", "ada", "--label", "x" * 101), "--label: at most 100"),
        (("key", "create", "ada", "--label", "x", "--expires-days", "0"), "--expires-days: "),
        (("key", "create", "ada", "--label", "x", "--expires-days", "1y"), "--expires-days: "),
        (("key", "revoke", "12"), "ID: '12' is not a key id"),
        (("key", "revoke", "00000000-0000-0000-0000-000000000000"), "ID: no key"),
        (("key", "list", "nobody"), "no user named 'nobody'"),
    ],
)
async def test_key_bad_input_is_one_line_naming_the_field(run, argv, expected):
    await run("user", "add", "ada", "--password-stdin", stdin="pw-123\n")
    code, _, err = await run(*argv)
    assert code == 2 and expected in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


async def test_key_commands_need_a_database_url_in_rest_only_mode(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("vtai.settings.load_dotenv", lambda **_: None)
    for name in ("VTAI_DATABASE_URL", "SUPABASE_DB_URL", "SUPABASE_SERVICE_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SUPABASE_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", "service-key")
    monkeypatch.setenv("SUPABASE_ANON_KEY", "anon-key")
    monkeypatch.setenv("VTAI_DATA_DIR", str(tmp_path))
    for argv in (["key", "list"], ["key", "create", "ada", "--label", "x"]):
        code = await asyncio.to_thread(cli.main, argv)
        _, err = capsys.readouterr()
        assert code == 2 and err.count("\n") == 1 and "set SUPABASE_DB_URL" in err, err
        assert err.startswith("vtai: `vtai key` needs a direct database connection")
    assert not (tmp_path / "pg").exists()
