"""Settings: defaults, aliases, and one clear line for every bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from vtai.models import LOCAL_MODEL_ID, available_models
from vtai.settings import SettingsError, load_settings


def test_defaults_are_embedded_local_and_monthly(tmp_path):
    s = load_settings({"VTAI_DATA_DIR": str(tmp_path)})
    assert s.embedded and s.database_url is None
    assert s.model == LOCAL_MODEL_ID and s.usage_period == "month"
    assert s.gate_fail_mode == "closed" and s.log_content == "full"
    assert s.data_dir == tmp_path and s.tier_limits == {}
    assert s.reserve_ahead is True
    assert load_settings({"VTAI_RESERVE_AHEAD": "off"}).reserve_ahead is False


def test_supabase_db_url_is_an_alias():
    s = load_settings({"SUPABASE_DB_URL": "postgresql://u:p@db.example.co:5432/postgres"})
    assert s.database_url.endswith("/postgres") and not s.embedded


def test_limits_override():
    s = load_settings({"VTAI_LIMIT_FREE": "500", "VTAI_LIMIT_PREMIUM": "1_000_000"})
    assert s.tier_limits == {"free": 500, "premium": 1_000_000}


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"VTAI_DATABASE_URL": "mysql://x@y/z"}, "VTAI_DATABASE_URL"),
        ({"VTAI_DATABASE_URL": "postgresql://u@h:port/db"}, "VTAI_DATABASE_URL"),
        ({"VTAI_LIMIT_FREE": "-5"}, "VTAI_LIMIT_FREE"),
        ({"VTAI_LIMIT_BASIC": "lots"}, "VTAI_LIMIT_BASIC"),
        ({"VTAI_MODEL": "no-such-model-anywhere"}, "VTAI_MODEL"),
        ({"VTAI_USAGE_PERIOD": "yearly"}, "VTAI_USAGE_PERIOD"),
        ({"VTAI_GATE_FAIL_MODE": "maybe"}, "VTAI_GATE_FAIL_MODE"),
        ({"VTAI_LOG_CONTENT": "some"}, "VTAI_LOG_CONTENT"),
        ({"VTAI_RESERVE_AHEAD": "sometimes"}, "VTAI_RESERVE_AHEAD"),
    ],
)
def test_bad_values_name_the_variable_in_one_line(env, variable):
    with pytest.raises(SettingsError) as err:
        load_settings(env)
    message = str(err.value)
    assert message.startswith(variable) and "\n" not in message


def test_password_never_echoed_in_url_errors():
    with pytest.raises(SettingsError) as err:
        load_settings({"VTAI_DATABASE_URL": "postgresql://u:hunter2@h:port/db"})
    assert "hunter2" not in str(err.value)


def test_picker_lists_local_plus_configured_providers_and_ignores_chainlit_ci_key():
    env = {"ANTHROPIC_API_KEY": "k", "OPENAI_API_KEY": "sk-FAKE-OPENAI-API-KEY"}
    offered = available_models(LOCAL_MODEL_ID, env)
    assert offered[0] == LOCAL_MODEL_ID
    assert any(m.startswith("anthropic/") for m in offered)
    assert not any(m.startswith("gpt-") for m in offered)


def test_data_dir_default_is_dot_vtai(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert load_settings({}).data_dir == Path(tmp_path / ".vtai")


def _jwt(role: str) -> str:
    from tests.fake_postgrest import token

    return token(role)


SERVICE, ANON = _jwt("service_role"), _jwt("anon")
URL = "https://project.supabase.co"


@pytest.mark.parametrize(
    ("env", "rest", "auth"),
    [
        (
            {"SUPABASE_URL": URL, "SUPABASE_SERVICE_ROLE_KEY": SERVICE, "SUPABASE_ANON_KEY": ANON},
            True,
            True,
        ),
        # The seeds' name for the service key.
        (
            {"SUPABASE_URL": URL, "SUPABASE_SERVICE_KEY": SERVICE, "SUPABASE_ANON_KEY": ANON},
            True,
            True,
        ),
        # A database URL wins over the REST path; the keys still serve Supabase Auth.
        (
            {
                "SUPABASE_URL": URL,
                "SUPABASE_SERVICE_ROLE_KEY": SERVICE,
                "SUPABASE_ANON_KEY": ANON,
                "SUPABASE_DB_URL": "postgresql://u:p@db.example.co:5432/postgres",
            },
            False,
            True,
        ),
        (
            {
                "SUPABASE_URL": URL,
                "SUPABASE_ANON_KEY": "sb_publishable_abc",
                "VTAI_DATABASE_URL": "postgresql://u:p@h:5432/db",
            },
            False,
            True,
        ),
    ],
)
def test_supabase_paths(env, rest, auth):
    s = load_settings(env)
    assert (s.rest_metering, s.supabase_auth, s.embedded) == (rest, auth, False)
    assert SERVICE not in repr(s) and ANON not in repr(s)


@pytest.mark.parametrize(
    ("env", "variable", "says"),
    [
        ({"SUPABASE_URL": URL}, "SUPABASE_URL", "without a key"),
        ({"SUPABASE_SERVICE_ROLE_KEY": SERVICE}, "SUPABASE_SERVICE_ROLE_KEY", "SUPABASE_URL"),
        ({"SUPABASE_ANON_KEY": ANON}, "SUPABASE_ANON_KEY", "SUPABASE_URL is not"),
        (
            {"SUPABASE_URL": "project.supabase.co", "SUPABASE_ANON_KEY": ANON},
            "SUPABASE_URL",
            "https://",
        ),
        (
            {"SUPABASE_URL": URL, "SUPABASE_SERVICE_ROLE_KEY": ANON, "SUPABASE_ANON_KEY": ANON},
            "SUPABASE_SERVICE_ROLE_KEY",
            "holds the anon key",
        ),
        (
            {
                "SUPABASE_URL": URL,
                "SUPABASE_SERVICE_KEY": "sb_publishable_x",
                "SUPABASE_ANON_KEY": ANON,
            },
            "SUPABASE_SERVICE_KEY",
            "service_role (secret)",
        ),
        (
            {
                "SUPABASE_URL": URL,
                "SUPABASE_SERVICE_ROLE_KEY": SERVICE,
                "SUPABASE_ANON_KEY": SERVICE,
            },
            "SUPABASE_ANON_KEY",
            "holds the service_role key",
        ),
        # Nowhere to keep profiles next to auth.users.
        ({"SUPABASE_URL": URL, "SUPABASE_ANON_KEY": ANON}, "SUPABASE_ANON_KEY", "SUPABASE_DB_URL"),
        # REST metering with nobody able to log in: local passwords live in the database.
        (
            {"SUPABASE_URL": URL, "SUPABASE_SERVICE_ROLE_KEY": SERVICE},
            "SUPABASE_SERVICE_ROLE_KEY",
            "SUPABASE_ANON_KEY",
        ),
    ],
)
def test_half_configured_supabase_is_one_line_without_the_keys(env, variable, says):
    with pytest.raises(SettingsError) as err:
        load_settings(env)
    message = str(err.value)
    assert message.startswith(variable) and says in message and "\n" not in message
    assert SERVICE not in message and ANON not in message and "sb_" not in message
