"""One settings object, read from the environment and `.env`.

Every bad value stops start-up with one line that names the variable (SettingsError).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from dotenv import load_dotenv

PERIODS = ("day", "week", "month", "lifetime")
FAIL_MODES = ("closed", "open")
LOG_CONTENT_MODES = ("full", "none", "redacted")
LIMIT_VARS = {
    "free": "VTAI_LIMIT_FREE",
    "basic": "VTAI_LIMIT_BASIC",
    "premium": "VTAI_LIMIT_PREMIUM",
}

# `chainlit run` in CI mode (CI=true) plants this key; it must not count as a configured key.
CHAINLIT_FAKE_OPENAI_KEY = "sk-FAKE-OPENAI-API-KEY"


class SettingsError(ValueError):
    """A configuration value is unusable; str() is one line naming the variable."""


@dataclass(frozen=True)
class Settings:
    database_url: str | None
    data_dir: Path
    model: str
    usage_period: str = "month"
    tier_limits: dict[str, int] = field(default_factory=dict)
    gate_fail_mode: str = "closed"
    log_content: str = "full"
    max_tokens: int = 512
    request_timeout: float = 120.0
    reservation_ttl: int = 900
    history: bool = True
    admin_username: str = "admin"

    @property
    def embedded(self) -> bool:
        return self.database_url is None

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"


def _choice(env: dict[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    value = env.get(name, "").strip().lower() or default
    if value not in choices:
        raise SettingsError(f"{name}: {value!r} is not one of {', '.join(choices)}")
    return value


def _int(env: dict[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        raise SettingsError(f"{name}: {raw!r} is not a whole number") from None
    if value < minimum:
        raise SettingsError(f"{name}: {value} is below the minimum of {minimum}")
    return value


def _database_url(env: dict[str, str]) -> str | None:
    for name in ("VTAI_DATABASE_URL", "SUPABASE_DB_URL"):
        url = env.get(name, "").strip()
        if not url:
            continue
        parts = urlsplit(url)
        if parts.scheme not in ("postgres", "postgresql") or not (parts.hostname or "host=" in url):
            raise SettingsError(
                f"{name}: expected postgresql://user:password@host:port/database, "
                f"got a value starting {url.split(':', 1)[0]!r}"
            )
        try:
            parts.port  # noqa: B018 - raises on a non-numeric port
        except ValueError:
            raise SettingsError(f"{name}: the port is not a number") from None
        return url
    return None


def _model(env: dict[str, str]) -> str:
    from vtai.models import LOCAL_MODEL_ID, validate_model_id

    model = env.get("VTAI_MODEL", "").strip() or LOCAL_MODEL_ID
    problem = validate_model_id(model)
    if problem:
        raise SettingsError(f"VTAI_MODEL: {problem}")
    return model


def load_settings(env: dict[str, str] | None = None, dotenv: bool = True) -> Settings:
    """Build Settings from `env` (default: os.environ after loading `.env`)."""
    if env is None:
        if dotenv:
            load_dotenv(override=False)
        env = dict(os.environ)
    limits = {tier: _int(env, var, -1) for tier, var in LIMIT_VARS.items()}
    return Settings(
        database_url=_database_url(env),
        data_dir=Path(env.get("VTAI_DATA_DIR", "").strip() or ".vtai").expanduser().resolve(),
        model=_model(env),
        usage_period=_choice(env, "VTAI_USAGE_PERIOD", PERIODS, "month"),
        tier_limits={tier: value for tier, value in limits.items() if value >= 0},
        gate_fail_mode=_choice(env, "VTAI_GATE_FAIL_MODE", FAIL_MODES, "closed"),
        log_content=_choice(env, "VTAI_LOG_CONTENT", LOG_CONTENT_MODES, "full"),
        max_tokens=_int(env, "VTAI_MAX_TOKENS", 512, minimum=1),
        request_timeout=float(_int(env, "VTAI_REQUEST_TIMEOUT", 120, minimum=1)),
        reservation_ttl=_int(env, "VTAI_RESERVATION_TTL", 900, minimum=10),
        history=_choice(env, "VTAI_HISTORY", ("on", "off"), "on") == "on",
        admin_username=env.get("VTAI_ADMIN_USER", "").strip() or "admin",
    )
