"""Settings: defaults, aliases, and one clear line for every bad value."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest
from pydantic import SecretStr

from tests.conftest import ROOT
from vtai import settings as settings_module
from vtai.llm.models import LOCAL_MODEL_ID, PROVIDER_MODELS, available_models, key_configured
from vtai.settings import PROVIDER_KEY_VARS, Settings, SettingsError, load_settings


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
        ({"SUPABASE_DB_URL": "mysql://x@y/z"}, "SUPABASE_DB_URL"),
        ({"VTAI_DATABASE_URL": "", "SUPABASE_DB_URL": "http://h/db"}, "SUPABASE_DB_URL"),
        ({"VTAI_LIMIT_PREMIUM": "1e6"}, "VTAI_LIMIT_PREMIUM"),
        ({"VTAI_MAX_TOKENS": "0"}, "VTAI_MAX_TOKENS"),
        ({"VTAI_REQUEST_TIMEOUT": "1.5"}, "VTAI_REQUEST_TIMEOUT"),
        ({"VTAI_REQUEST_TIMEOUT": "0"}, "VTAI_REQUEST_TIMEOUT"),
        ({"VTAI_RESERVATION_TTL": "9"}, "VTAI_RESERVATION_TTL"),
        ({"VTAI_RESERVE_COMMIT": "lazy"}, "VTAI_RESERVE_COMMIT"),
        ({"VTAI_HISTORY": "yes"}, "VTAI_HISTORY"),
        ({"VTAI_ALLOWED_ORIGINS": "https://a.example, a.example"}, "VTAI_ALLOWED_ORIGINS"),
        ({"VTAI_ALLOWED_ORIGINS": "https://a.example/app"}, "VTAI_ALLOWED_ORIGINS"),
        ({"VTAI_PUBLIC_URL": "chat.example.com"}, "VTAI_PUBLIC_URL"),
        ({"VTAI_SESSION_TTL": "59"}, "VTAI_SESSION_TTL"),
        ({"VTAI_SESSION_TTL": "a week"}, "VTAI_SESSION_TTL"),
        ({"VTAI_MAX_MESSAGE_CHARS": "0"}, "VTAI_MAX_MESSAGE_CHARS"),
        ({"VTAI_DISCONNECT_GRACE": "-1"}, "VTAI_DISCONNECT_GRACE"),
        ({"VTAI_TRUSTED_PROXIES": "10.0.0.0/8, proxy.local"}, "VTAI_TRUSTED_PROXIES"),
        ({"CHAINLIT_PORT": "http"}, "CHAINLIT_PORT"),
        ({"CHAINLIT_PORT": "70000"}, "CHAINLIT_PORT"),
        ({"VTAI_BALANCE_SYNC_INTERVAL": "hourly"}, "VTAI_BALANCE_SYNC_INTERVAL"),
        ({"VTAI_OPENROUTER_BASE": "openrouter.ai"}, "VTAI_OPENROUTER_BASE"),
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


# --- Every variable, parsed -------------------------------------------------------------------

DB = "postgresql://u:p@db.example.co:5432/postgres"
SOCKET = "postgresql:///vtai?host=/run/postgresql"


@pytest.mark.parametrize(
    ("env", "field", "value"),
    [
        ({"VTAI_DATABASE_URL": f"  {DB} "}, "database_url", DB),
        ({"SUPABASE_DB_URL": DB}, "database_url", DB),
        # A libpq socket path: no host part.
        ({"VTAI_DATABASE_URL": SOCKET}, "database_url", SOCKET),
        ({"VTAI_DATA_DIR": "/srv/vtai/data"}, "data_dir", Path("/srv/vtai/data")),
        ({"VTAI_DATA_DIR": "~/vtai"}, "data_dir", Path.home() / "vtai"),
        ({"VTAI_MODEL": "openai/gpt-4o-mini"}, "model", "openai/gpt-4o-mini"),
        ({"VTAI_MODEL": " "}, "model", LOCAL_MODEL_ID),
        ({"VTAI_MAX_TOKENS": "2_048"}, "max_tokens", 2048),
        ({"VTAI_REQUEST_TIMEOUT": "30"}, "request_timeout", 30.0),
        ({"VTAI_USAGE_PERIOD": " Week "}, "usage_period", "week"),
        ({"VTAI_USAGE_PERIOD": "lifetime"}, "usage_period", "lifetime"),
        ({"VTAI_LIMIT_BASIC": "0"}, "tier_limits", {"basic": 0}),
        ({"VTAI_RESERVATION_TTL": "10"}, "reservation_ttl", 10),
        ({"VTAI_GATE_FAIL_MODE": "OPEN"}, "gate_fail_mode", "open"),
        ({"VTAI_RESERVE_COMMIT": "fast"}, "reserve_commit", "fast"),
        ({"VTAI_RESERVE_AHEAD": "on"}, "reserve_ahead", True),
        ({"VTAI_LOG_CONTENT": "redacted"}, "log_content", "redacted"),
        ({"VTAI_LOG_CONTENT": "none"}, "log_content", "none"),
        ({"VTAI_HISTORY": "off"}, "history", False),
        ({"VTAI_ADMIN_USER": "root"}, "admin_username", "root"),
        ({"VTAI_ADMIN_USER": ""}, "admin_username", "admin"),
        (
            {"VTAI_ALLOWED_ORIGINS": "https://a.example/, http://b.example:8080,"},
            "allowed_origins",
            ("https://a.example", "http://b.example:8080"),
        ),
        ({"VTAI_ALLOWED_ORIGINS": ""}, "allowed_origins", ()),
        (
            {"VTAI_PUBLIC_URL": "https://chat.example.com/"},
            "public_url",
            "https://chat.example.com",
        ),
        ({"VTAI_SESSION_TTL": "3600"}, "session_ttl", 3600),
        ({"VTAI_MAX_MESSAGE_CHARS": "100"}, "max_message_chars", 100),
        ({"VTAI_DISCONNECT_GRACE": "0"}, "disconnect_grace", 0),
        (
            {"VTAI_TRUSTED_PROXIES": "10.1.2.3/8, ::1, 192.168.0.7"},
            "trusted_proxies",
            ("10.0.0.0/8", "::1/128", "192.168.0.7/32"),
        ),
        ({"CHAINLIT_HOST": "0.0.0.0"}, "chainlit_host", "0.0.0.0"),
        ({"CHAINLIT_PORT": "8080"}, "chainlit_port", 8080),
        ({"VTAI_BALANCE_SYNC_INTERVAL": "0"}, "balance_sync_interval", 0),
        (
            {"VTAI_OPENROUTER_BASE": "http://127.0.0.1:9/ok"},
            "openrouter_base",
            "http://127.0.0.1:9/ok",
        ),
        (
            {
                "SUPABASE_URL": "https://p.supabase.co/",
                "SUPABASE_ANON_KEY": "sb_publishable_x",
                "SUPABASE_DB_URL": DB,
            },
            "supabase_url",
            "https://p.supabase.co",
        ),
    ],
)
def test_each_variable_is_parsed(env, field, value):
    assert getattr(load_settings(env), field) == value


def test_defaults_of_the_rest():
    s = load_settings({})
    assert (s.max_tokens, s.request_timeout, s.reservation_ttl) == (512, 120.0, 900)
    assert (s.session_ttl, s.max_message_chars, s.disconnect_grace) == (604800, 32_000, 30)
    assert (s.allowed_origins, s.public_url, s.trusted_proxies) == ((), None, ())
    assert (s.admin_username, s.admin_password, s.chainlit_auth_secret) == ("admin", None, None)
    assert (s.chainlit_host, s.chainlit_port, s.balance_sync_interval) == ("127.0.0.1", 8000, 3600)
    assert s.history and s.reserve_commit == "durable" and s.provider_keys == {}
    assert s.spool_dir == s.data_dir / "spool"


def test_every_variable_in_env_example_is_read_by_settings():
    example = (ROOT / ".env.example").read_text()
    names = set(re.findall(r"^# ([A-Z][A-Z0-9_]+)=", example, re.MULTILINE))
    known = set()
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        known.update(alias.choices if hasattr(alias, "choices") else [alias])
    assert len(names) > 30 and names <= known, names - known


def test_one_line_errors_are_exact():
    with pytest.raises(SettingsError, match=r"^VTAI_MAX_TOKENS: 'abc' is not a whole number$"):
        load_settings({"VTAI_MAX_TOKENS": "abc"})
    with pytest.raises(SettingsError, match=r"^VTAI_LIMIT_FREE: -5 is below the minimum of 0$"):
        load_settings({"VTAI_LIMIT_FREE": "-5"})
    with pytest.raises(SettingsError, match=r"^VTAI_USAGE_PERIOD: 'yearly' is not one of day, "):
        load_settings({"VTAI_USAGE_PERIOD": "yearly"})


# --- Constructing Settings directly (tests, benchmarks) -----------------------------------------


def test_settings_built_from_values_read_no_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VTAI_MAX_TOKENS", "7")
    monkeypatch.setenv("SUPABASE_URL", "https://p.supabase.co")
    s = Settings(database_url=DB, data_dir=tmp_path, model=LOCAL_MODEL_ID, tier_limits={"free": 5})
    assert s.max_tokens == 512 and s.supabase_url is None and s.data_dir == tmp_path
    assert s.tier_limits == {"free": 5} and not s.embedded
    # A model given by name is taken as it is; VTAI_MODEL must be one LiteLLM routes.
    assert Settings(model="placeholder/x").model == "placeholder/x"
    # Bad python values are one line naming the variable too; a misspelt field is refused.
    with pytest.raises(SettingsError, match=r"^VTAI_MAX_TOKENS: 0 is below the minimum of 1$"):
        Settings(max_tokens=0)
    with pytest.raises(SettingsError, match="^max_tokenz: "):
        Settings(max_tokenz=5)


def test_settings_are_frozen_and_copied_with_changes(tmp_path):
    s = Settings(database_url=DB, data_dir=tmp_path, model=LOCAL_MODEL_ID)
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance ValidationError
        s.model = "gpt-4o-mini"
    t = s.model_copy(update={"model": "gpt-4o-mini", "history": False})
    assert (t.model, t.history, s.model, s.history) == ("gpt-4o-mini", False, LOCAL_MODEL_ID, True)


def test_supabase_keys_given_as_values_are_secret(tmp_path):
    s = Settings(
        database_url=None,
        data_dir=tmp_path,
        supabase_url=URL,
        supabase_service_key=SERVICE,
        supabase_anon_key=ANON,
    )
    assert s.rest_metering and s.supabase_auth and not s.embedded
    assert isinstance(s.supabase_service_key, SecretStr)
    assert s.supabase_service_key.get_secret_value() == SERVICE
    again = Settings(**{**s.model_dump(), "data_dir": tmp_path})
    assert again.supabase_anon_key.get_secret_value() == ANON


# --- Secrets ------------------------------------------------------------------------------------


def test_secrets_never_appear_in_repr_str_json_or_logs(caplog):
    secrets = {
        "SUPABASE_SERVICE_ROLE_KEY": SERVICE,
        "SUPABASE_ANON_KEY": ANON,
        "VTAI_ADMIN_PASSWORD": "admin-password-123",
        "CHAINLIT_AUTH_SECRET": "chainlit-auth-secret-456",
        "OPENAI_API_KEY": "sk-openai-secret-789",
        "ANTHROPIC_API_KEY": "sk-ant-secret-012",
        "GEMINI_API_KEY": "gemini-secret-345",
        "OPENROUTER_API_KEY": "sk-or-secret-678",
    }
    s = load_settings(
        {**secrets, "SUPABASE_URL": URL, "VTAI_DATABASE_URL": "postgresql://u:db-pass-901@h/db"}
    )
    logging.getLogger("test").warning("settings: %s %r", s, s)
    shown = [repr(s), str(s), s.model_dump_json(), caplog.text]
    for value in [*secrets.values(), "db-pass-901"]:
        assert not any(value in text for text in shown[:2] + shown[3:]), value
    for value in secrets.values():
        assert value not in shown[2]
    assert s.admin_password.get_secret_value() == "admin-password-123"
    assert s.chainlit_auth_secret.get_secret_value() == "chainlit-auth-secret-456"
    assert {k: v.get_secret_value() for k, v in s.provider_keys.items()} == {
        k: secrets[k] for k in PROVIDER_KEY_VARS
    }


# --- The same database for the app and the scripts ----------------------------------------------


@pytest.fixture
def environ(monkeypatch, tmp_path):
    """A private os.environ without VT.ai's variables, in a directory without a .env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VTAI_", "SUPABASE_"))}
    monkeypatch.setattr(os, "environ", env)
    monkeypatch.chdir(tmp_path)
    return env


def test_vtai_database_url_wins_over_supabase_db_url_for_app_and_scripts(environ, monkeypatch):
    environ["SUPABASE_DB_URL"] = "postgresql://u:p@supabase.example:5432/postgres"
    environ["VTAI_DATABASE_URL"] = "postgresql://u:p@vtai.example:5432/vtai"
    assert load_settings().database_url.endswith("@vtai.example:5432/vtai")
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import _common

    assert _common.database_url(None).endswith("@vtai.example:5432/vtai")
    assert _common.database_url("postgresql://cli/x") == "postgresql://cli/x"
    # Set in .env, VTAI_DATABASE_URL still wins over SUPABASE_DB_URL from the environment.
    del environ["VTAI_DATABASE_URL"]
    Path(".env").write_text("VTAI_DATABASE_URL=postgresql://u:p@dotenv.example/vtai\n")
    assert load_settings().database_url.endswith("@dotenv.example/vtai")
    assert _common.database_url(None).endswith("@dotenv.example/vtai")


def test_scripts_report_a_missing_or_bad_database_url_in_one_line(environ, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import _common

    with pytest.raises(_common.ScriptError) as err:
        _common.database_url(None)
    assert err.value.code == _common.USAGE and "VTAI_DATABASE_URL" in str(err.value)
    environ["SUPABASE_DB_URL"] = "mysql://u:secret@h/db"
    with pytest.raises(_common.ScriptError) as err:
        _common.database_url(None)
    assert str(err.value).startswith("SUPABASE_DB_URL: ") and "secret" not in str(err.value)


# --- .env ---------------------------------------------------------------------------------------


def test_dotenv_in_the_working_directory_is_read_and_the_environment_wins(environ):
    Path(".env").write_text(
        "# a comment\n"
        "VTAI_MAX_TOKENS=64\n"
        "VTAI_USAGE_PERIOD=day\n"
        "VTAI_HISTORY=off\n"
        "VTAI_DATABASE_URL='postgresql://u:p@from-dotenv/db'\n"
        "OPENAI_API_KEY=sk-from-dotenv\n"
        "SOME_LIBRARY_SETTING=x\n"
    )
    environ["VTAI_USAGE_PERIOD"] = "week"
    environ["VTAI_DATABASE_URL"] = ""  # set, even empty, it hides .env's: unset
    # dotenv=False, or an explicit env, reads no file.
    assert load_settings(dotenv=False).max_tokens == 512 and "OPENAI_API_KEY" not in environ
    assert load_settings({}).max_tokens == 512
    s = load_settings()
    assert (s.max_tokens, s.usage_period, s.history, s.database_url) == (64, "week", False, None)
    assert s.provider_keys["OPENAI_API_KEY"].get_secret_value() == "sk-from-dotenv"
    # Exported where unset, for LiteLLM and Chainlit, which read their own variables.
    assert environ["OPENAI_API_KEY"] == "sk-from-dotenv" and environ["SOME_LIBRARY_SETTING"] == "x"
    assert environ["VTAI_USAGE_PERIOD"] == "week" and environ["VTAI_DATABASE_URL"] == ""


def test_a_bad_value_in_dotenv_is_one_line_naming_it(environ):
    Path(".env").write_text("VTAI_GATE_FAIL_MODE=sometimes\n")
    with pytest.raises(SettingsError, match=r"^VTAI_GATE_FAIL_MODE: 'sometimes' is not one of"):
        load_settings()


# --- Provider keys and the picker ---------------------------------------------------------------


def test_provider_keys_are_the_pickers(environ, tmp_path):
    assert set(PROVIDER_MODELS) == set(PROVIDER_KEY_VARS)
    assert settings_module._LOCAL_MODEL_ID == LOCAL_MODEL_ID
    environ["GEMINI_API_KEY"] = "g-key"
    environ["OPENAI_API_KEY"] = "sk-FAKE-OPENAI-API-KEY"  # Chainlit's CI placeholder
    offered = available_models(LOCAL_MODEL_ID)  # this process's environment, read now
    assert any(m.startswith("gemini/") for m in offered)
    assert not any(m.startswith("gpt-") for m in offered)
    assert key_configured("GEMINI_API_KEY") and not key_configured("OPENAI_API_KEY")
    # From a Settings object: what it was given, not the environment.
    s = Settings(data_dir=tmp_path, anthropic_api_key="a-key")
    assert key_configured("ANTHROPIC_API_KEY", settings=s)
    assert not key_configured("GEMINI_API_KEY", settings=s)
    assert any(m.startswith("anthropic/") for m in available_models("gpt-4o", settings=s))
