"""One settings object, read from the environment and `.env`.

Every bad value stops start-up with one line that names the variable (SettingsError).
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from dotenv import load_dotenv

PERIODS = ("day", "week", "month", "lifetime")
FAIL_MODES = ("closed", "open")
RESERVE_COMMITS = ("durable", "fast")
LOG_CONTENT_MODES = ("full", "none", "redacted")
LIMIT_VARS = {
    "free": "VTAI_LIMIT_FREE",
    "basic": "VTAI_LIMIT_BASIC",
    "premium": "VTAI_LIMIT_PREMIUM",
}

# What the features that need SQL of their own say in REST mode.
NEEDS_DATABASE = (
    "needs a direct database connection, which REST-only metering has not got: "
    "set SUPABASE_DB_URL (or VTAI_DATABASE_URL) to turn it on"
)

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
    reserve_commit: str = "durable"
    reserve_ahead: bool = True
    log_content: str = "full"
    max_tokens: int = 512
    request_timeout: float = 120.0
    reservation_ttl: int = 900
    history: bool = True
    admin_username: str = "admin"
    # Keys stay out of repr(), so a logged Settings never carries them.
    supabase_url: str | None = None
    supabase_service_key: str | None = field(default=None, repr=False)
    supabase_anon_key: str | None = field(default=None, repr=False)
    # Security (docs/security.md).
    # Origins besides the app's own that may call it with credentials (CORS, socket.io).
    allowed_origins: tuple[str, ...] = ()
    # The app's public origin behind a proxy, e.g. https://chat.example.com (return URLs too).
    public_url: str | None = None
    # How long a login lasts, in seconds; logout, a password change or a disable end it sooner.
    session_ttl: int = 7 * 24 * 3600
    # A chat message (or API message) longer than this is refused before it is stored.
    max_message_chars: int = 32_000
    # Seconds a turn keeps running for a client whose socket dropped, waiting for it to return.
    disconnect_grace: int = 30
    # Proxies whose X-Forwarded-For is believed (addresses or CIDR networks).
    trusted_proxies: tuple[str, ...] = ()

    @property
    def rest_metering(self) -> bool:
        """Metering over Supabase's REST API: a service key and no database URL.

        A database URL wins when both are set: one round trip per call, transactions, and no
        REST gateway in between (docs/supabase.md).
        """
        return self.database_url is None and bool(self.supabase_url and self.supabase_service_key)

    @property
    def embedded(self) -> bool:
        return self.database_url is None and not self.rest_metering

    @property
    def supabase_auth(self) -> bool:
        """Password logins go to Supabase Auth rather than VT.ai's own credential store."""
        return bool(self.supabase_url and self.supabase_anon_key)

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


def _supabase_url(env: dict[str, str]) -> str | None:
    url = env.get("SUPABASE_URL", "").strip().rstrip("/")
    if not url:
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError(
            "SUPABASE_URL: expected the project URL, https://PROJECT.supabase.co "
            "(Project Settings -> API)"
        )
    return url


def key_role(key: str) -> str | None:
    """The role a Supabase API key acts as ('anon', 'service_role'), read without verifying it.

    Legacy keys are JWTs with a `role` claim; new keys say it in their prefix. None: unknown.
    """
    if key.startswith("sb_publishable_"):
        return "anon"
    if key.startswith("sb_secret_"):
        return "service_role"
    parts = key.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, UnicodeDecodeError):
        return None
    role = claims.get("role") if isinstance(claims, dict) else None
    return role if isinstance(role, str) else None


def _supabase_keys(env: dict[str, str], url: str | None, database_url: str | None):
    """(service key, anon key), refusing half-configured combinations. Never echoes a key."""
    service_var = next(
        (
            n
            for n in ("SUPABASE_SERVICE_ROLE_KEY", "SUPABASE_SERVICE_KEY")
            if env.get(n, "").strip()
        ),
        None,
    )
    service = env[service_var].strip() if service_var else None
    anon = env.get("SUPABASE_ANON_KEY", "").strip() or None
    if url is None:
        for name, value in ((service_var, service), ("SUPABASE_ANON_KEY", anon)):
            if value:
                raise SettingsError(
                    f"{name} is set but SUPABASE_URL is not: add the project URL "
                    "(Project Settings -> API) or remove the key"
                )
        return None, None
    if service is None and anon is None:
        raise SettingsError(
            "SUPABASE_URL is set without a key: add SUPABASE_SERVICE_ROLE_KEY (metering over "
            "REST) and/or SUPABASE_ANON_KEY (Supabase Auth login), or remove SUPABASE_URL"
        )
    if service is not None and key_role(service) not in (None, "service_role"):
        raise SettingsError(
            f"{service_var} holds the {key_role(service)} key: use the service_role (secret) "
            "key from Project Settings -> API Keys"
        )
    if anon is not None and key_role(anon) == "service_role":
        raise SettingsError(
            "SUPABASE_ANON_KEY holds the service_role key: put the anon (public) key there "
            "and keep the service_role key in SUPABASE_SERVICE_ROLE_KEY only"
        )
    if database_url is None and service is None:
        raise SettingsError(
            "SUPABASE_ANON_KEY: Supabase Auth login needs the project's database for profiles "
            "and usage: set SUPABASE_DB_URL or SUPABASE_SERVICE_ROLE_KEY"
        )
    if database_url is None and anon is None:
        raise SettingsError(
            f"{service_var}: metering over REST (no database URL) needs SUPABASE_ANON_KEY for "
            "login, since passwords then live in Supabase Auth; or set SUPABASE_DB_URL"
        )
    return service, anon


def _origin(name: str, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise SettingsError(f"{name}: {value!r} is not an origin such as https://chat.example.com")
    return f"{parts.scheme}://{parts.netloc}"


def _list(env: dict[str, str], name: str) -> list[str]:
    return [item.strip() for item in env.get(name, "").split(",") if item.strip()]


def _networks(env: dict[str, str], name: str) -> tuple[str, ...]:
    import ipaddress

    out = []
    for item in _list(env, name):
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise SettingsError(f"{name}: {item!r} is not an address or network") from None
    return tuple(out)


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
    database_url = _database_url(env)
    supabase_url = _supabase_url(env)
    service_key, anon_key = _supabase_keys(env, supabase_url, database_url)
    return Settings(
        database_url=database_url,
        data_dir=Path(env.get("VTAI_DATA_DIR", "").strip() or ".vtai").expanduser().resolve(),
        model=_model(env),
        usage_period=_choice(env, "VTAI_USAGE_PERIOD", PERIODS, "month"),
        tier_limits={tier: value for tier, value in limits.items() if value >= 0},
        gate_fail_mode=_choice(env, "VTAI_GATE_FAIL_MODE", FAIL_MODES, "closed"),
        reserve_commit=_choice(env, "VTAI_RESERVE_COMMIT", RESERVE_COMMITS, "durable"),
        reserve_ahead=_choice(env, "VTAI_RESERVE_AHEAD", ("on", "off"), "on") == "on",
        log_content=_choice(env, "VTAI_LOG_CONTENT", LOG_CONTENT_MODES, "full"),
        max_tokens=_int(env, "VTAI_MAX_TOKENS", 512, minimum=1),
        request_timeout=float(_int(env, "VTAI_REQUEST_TIMEOUT", 120, minimum=1)),
        reservation_ttl=_int(env, "VTAI_RESERVATION_TTL", 900, minimum=10),
        history=_choice(env, "VTAI_HISTORY", ("on", "off"), "on") == "on",
        admin_username=env.get("VTAI_ADMIN_USER", "").strip() or "admin",
        supabase_url=supabase_url,
        supabase_service_key=service_key,
        supabase_anon_key=anon_key,
        allowed_origins=tuple(
            _origin("VTAI_ALLOWED_ORIGINS", o) for o in _list(env, "VTAI_ALLOWED_ORIGINS")
        ),
        public_url=_origin("VTAI_PUBLIC_URL", env["VTAI_PUBLIC_URL"].strip())
        if env.get("VTAI_PUBLIC_URL", "").strip()
        else None,
        session_ttl=_int(env, "VTAI_SESSION_TTL", 7 * 24 * 3600, minimum=60),
        max_message_chars=_int(env, "VTAI_MAX_MESSAGE_CHARS", 32_000, minimum=1),
        disconnect_grace=_int(env, "VTAI_DISCONNECT_GRACE", 30, minimum=0),
        trusted_proxies=_networks(env, "VTAI_TRUSTED_PROXIES"),
    )
