"""One settings object, read from the environment and `.env` by pydantic-settings.

`Settings` is the only reader of VT.ai's variables, for the app, the `vtai` command, the
scripts and the benchmarks. `load_settings()` (or `Settings.from_env()`) reads the process
environment and `./.env` (a variable already set, even to an empty value, wins over the file);
`Settings(field=value, ...)` takes python values as given and reads nothing, as tests need.

Every bad value stops start-up with one line that names the variable (SettingsError). Keys and
passwords are `SecretStr`: repr(), str() and logs show `**********`; `.get_secret_value()` is
the one way to the text.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    AliasChoices,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

PERIODS = ("day", "week", "month", "lifetime", "billing")
FAIL_MODES = ("closed", "open")
RESERVE_COMMITS = ("durable", "fast")
LOG_CONTENT_MODES = ("full", "none", "redacted")
LIMIT_VARS = {
    "free": "VTAI_LIMIT_FREE",
    "basic": "VTAI_LIMIT_BASIC",
    "premium": "VTAI_LIMIT_PREMIUM",
}
# The provider keys that add a provider's models to the picker (vtai.llm.models), by variable.
# LiteLLM reads them from the environment itself; Settings reads them to know which are set.
PROVIDER_KEY_VARS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "OPENROUTER_API_KEY")

# What the features that need SQL of their own say in REST mode.
NEEDS_DATABASE = (
    "needs a direct database connection, which REST-only metering has not got: "
    "set SUPABASE_DB_URL (or VTAI_DATABASE_URL) to turn it on"
)

# `chainlit run` in CI mode (CI=true) plants this key; it must not count as a configured key.
CHAINLIT_FAKE_OPENAI_KEY = "sk-FAKE-OPENAI-API-KEY"

# vtai.llm.models.LOCAL_MODEL_ID, repeated so that checking the default model needs no LiteLLM
# import (about 2 s), which the scripts would otherwise pay (tests/test_settings.py checks it).
_LOCAL_MODEL_ID = "local/smollm2-135m"
DOTENV = ".env"


class SettingsError(ValueError):
    """A configuration value is unusable; str() is one line naming the variable."""


# --- Parsing one value -----------------------------------------------------------------------
# Validators raise _bad(reason); the variable's name is put in front of it by _one_line().


def _bad(reason: str) -> PydanticCustomError:
    return PydanticCustomError("vtai_setting", "{reason}", {"reason": reason})


def _whole(value: Any) -> Any:
    """A whole number from the environment ('1_000' too); python numbers pass through."""
    if not isinstance(value, str):
        return value
    raw = value.strip()
    try:
        return int(raw.replace("_", ""))
    except ValueError:
        raise _bad(f"{raw!r} is not a whole number") from None


def _at_least(minimum: int) -> AfterValidator:
    def check(value):
        if value < minimum:
            raise _bad(f"{value} is below the minimum of {minimum}")
        return value

    return AfterValidator(check)


def _at_most(maximum: int) -> AfterValidator:
    def check(value):
        if value > maximum:
            raise _bad(f"{value} is above the maximum of {maximum}")
        return value

    return AfterValidator(check)


def _one_of(choices: tuple[str, ...]):
    def parse(value: Any) -> Any:
        if not isinstance(value, str):
            return value
        value = value.strip().lower()
        if value not in choices:
            raise _bad(f"{value!r} is not one of {', '.join(choices)}")
        return value

    return BeforeValidator(parse)


def _on_off(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    value = value.strip().lower()
    if value not in ("on", "off"):
        raise _bad(f"{value!r} is not one of on, off")
    return value == "on"


def _items(value: Any) -> Any:
    """A comma-separated list from the environment; a python sequence passes through."""
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    return value


def _origin(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise _bad(f"{value!r} is not an origin such as https://chat.example.com")
    return f"{parts.scheme}://{parts.netloc}"


def _network(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise _bad(f"{value!r} is not an address or network") from None


def _database_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql") or not (parts.hostname or "host=" in url):
        # Never the whole value: it carries the password.
        raise _bad(
            "expected postgresql://user:password@host:port/database, "
            f"got a value starting {url.split(':', 1)[0]!r}"
        )
    try:
        parts.port  # noqa: B018 - raises on a non-numeric port
    except ValueError:
        raise _bad("the port is not a number") from None
    return url


def _supabase_url(url: str) -> str:
    url = url.rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _bad(
            "expected the project URL, https://PROJECT.supabase.co (Project Settings -> API)"
        )
    return url


def _http_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _bad(f"{url!r} is not an http(s) URL")
    return url


def _model_problem(model: str) -> str | None:
    if model == _LOCAL_MODEL_ID:
        return None
    from vtai.llm.models import validate_model_id

    return validate_model_id(model)


def _blank_is_unset(value: Any) -> Any:
    """A blank string is an unset variable; other strings lose their surrounding blanks."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, SecretStr):
        return _blank_is_unset(value.get_secret_value())
    return value


def _or_default(default: str):
    return BeforeValidator(lambda value: _blank_is_unset(value) or default)


def _optional(check) -> AfterValidator:
    """An after-check for a field that may be None (unset)."""
    inner = check.func if isinstance(check, AfterValidator) else check
    return AfterValidator(lambda value: None if value is None else inner(value))


def _data_dir(value: Any) -> Path:
    """Unset: .vtai in the working directory; always made absolute."""
    if isinstance(value, str):
        value = _blank_is_unset(value) or ".vtai"
    return Path(value).expanduser().resolve()


def _stripe_prices(value: Any) -> Any:
    """VTAI_STRIPE_PRICES: a JSON object from Stripe Price ids to a tier name or to a top-up
    pack, {"price_abc": "premium", "price_def": {"topup_tokens": 50000}}."""
    if isinstance(value, str):
        value = value.strip() or "{}"
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise _bad(f"not JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(value, Mapping):
        raise _bad('expected a JSON object such as {"price_abc": "premium"}')
    prices: dict[str, Any] = {}
    for price, what in value.items():
        if not isinstance(price, str) or not price.strip():
            raise _bad("a Price id is blank")
        if isinstance(what, str) and what.strip():
            prices[price] = what.strip()
            continue
        tokens = what.get("topup_tokens") if isinstance(what, Mapping) else None
        extra = set(what) - {"topup_tokens"} if isinstance(what, Mapping) else set()
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens <= 0 or extra:
            raise _bad(f'{price}: expected a tier name or {{"topup_tokens": N}} with N above 0')
        prices[price] = {"topup_tokens": tokens}
    return prices


def _amount(value: Any) -> Any:
    """A decimal number from the environment ('2.5'); python numbers pass through."""
    if not isinstance(value, str):
        return value
    raw = value.strip()
    try:
        amount = Decimal(raw.replace("_", ""))
    except InvalidOperation:
        raise _bad(f"{raw!r} is not a number") from None
    if not amount.is_finite():
        raise _bad(f"{raw!r} is not a number")
    return amount


def _percents(value: Any) -> Any:
    """VTAI_WARN_AT: percents such as '80,100'; 'off' for none; blank: the default."""
    if not isinstance(value, str):
        return value
    if value.strip().lower() == "off":
        return ()
    items = _items(value) or ("80", "100")
    found = sorted({_whole(item) for item in items})
    if found[0] < 1 or found[-1] > 1000:
        raise _bad("percents run from 1 to 1000")
    return tuple(found)


Whole = Annotated[int, BeforeValidator(_whole)]
Seconds = Annotated[float, BeforeValidator(_whole)]
Amount = Annotated[Decimal, BeforeValidator(_amount)]
Text = Annotated[str | None, BeforeValidator(_blank_is_unset)]
Secret = Annotated[SecretStr | None, BeforeValidator(_blank_is_unset)]


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


# --- The settings ----------------------------------------------------------------------------


def _var(name: str, *more: str):
    """The field's variable(s), in order of preference; a field's own name is accepted too."""
    return AliasChoices(name, *more)


class Settings(BaseSettings):
    """VT.ai's settings. Field names are what code uses; each field's first alias is its
    variable in the environment and `.env` (`.env.example` describes them)."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        validate_by_name=True,
        validate_by_alias=True,
        case_sensitive=True,
        # No file for Settings(...): from_env() reads DOTENV through load_dotenv().
        env_file=None,
        hide_input_in_errors=True,
    )

    # --- Database (a URL wins over the REST path; unset, the embedded Postgres) ---------------
    # Not DATABASE_URL: Chainlit claims that name for its own data layer.
    database_url: Annotated[Text, _optional(_database_url)] = Field(
        None, validation_alias=_var("VTAI_DATABASE_URL", "SUPABASE_DB_URL")
    )
    data_dir: Annotated[Path, BeforeValidator(_data_dir)] = Field(
        Path(".vtai"), validation_alias=_var("VTAI_DATA_DIR"), validate_default=True
    )
    # This process's own spool and journal when several share the data dir (`make run
    # WORKERS=N` sets VTAI_DATA_DIR/procs/<n>); unset, the data dir.
    process_dir: Annotated[Path | None, BeforeValidator(_blank_is_unset)] = Field(
        None, validation_alias=_var("VTAI_PROCESS_DIR")
    )

    # --- Supabase API (docs/supabase.md) ----------------------------------------------------
    supabase_url: Annotated[Text, _optional(_supabase_url)] = Field(
        None, validation_alias=_var("SUPABASE_URL")
    )
    # The service_role key; SUPABASE_SERVICE_KEY is its older name.
    supabase_service_key: Secret = Field(
        None, validation_alias=_var("SUPABASE_SERVICE_ROLE_KEY", "SUPABASE_SERVICE_KEY")
    )
    supabase_anon_key: Secret = Field(None, validation_alias=_var("SUPABASE_ANON_KEY"))

    # --- Models -------------------------------------------------------------------------------
    # From the environment it must be a model LiteLLM can route; a value given by name (tests,
    # benchmarks) is taken as it is.
    model: Annotated[str, _or_default(_LOCAL_MODEL_ID)] = Field(
        _LOCAL_MODEL_ID, validation_alias=_var("VTAI_MODEL")
    )
    max_tokens: Annotated[Whole, _at_least(1)] = Field(
        512, validation_alias=_var("VTAI_MAX_TOKENS")
    )
    request_timeout: Annotated[Seconds, _at_least(1)] = Field(
        120.0, validation_alias=_var("VTAI_REQUEST_TIMEOUT")
    )
    # Provider keys: LiteLLM reads them itself; these say which providers the picker offers.
    openai_api_key: Secret = Field(None, validation_alias=_var("OPENAI_API_KEY"))
    anthropic_api_key: Secret = Field(None, validation_alias=_var("ANTHROPIC_API_KEY"))
    gemini_api_key: Secret = Field(None, validation_alias=_var("GEMINI_API_KEY"))
    openrouter_api_key: Secret = Field(None, validation_alias=_var("OPENROUTER_API_KEY"))
    # Where LiteLLM sends OpenAI calls when set (its own variables, in its order); `vtai doctor`
    # checks OPENAI_API_KEY against the same server.
    openai_api_base: Text = Field(None, validation_alias=_var("OPENAI_BASE_URL", "OPENAI_API_BASE"))

    # --- Metering -----------------------------------------------------------------------------
    usage_period: Annotated[str, _one_of(PERIODS)] = Field(
        "month", validation_alias=_var("VTAI_USAGE_PERIOD")
    )
    # Tier limits in tokens per period; None: the migration's default (`tier_limits` below).
    limit_free: Annotated[int | None, BeforeValidator(_whole), _optional(_at_least(0))] = Field(
        None, validation_alias=_var("VTAI_LIMIT_FREE")
    )
    limit_basic: Annotated[int | None, BeforeValidator(_whole), _optional(_at_least(0))] = Field(
        None, validation_alias=_var("VTAI_LIMIT_BASIC")
    )
    limit_premium: Annotated[int | None, BeforeValidator(_whole), _optional(_at_least(0))] = Field(
        None, validation_alias=_var("VTAI_LIMIT_PREMIUM")
    )
    reservation_ttl: Annotated[Whole, _at_least(10)] = Field(
        900, validation_alias=_var("VTAI_RESERVATION_TTL")
    )
    gate_fail_mode: Annotated[str, _one_of(FAIL_MODES)] = Field(
        "closed", validation_alias=_var("VTAI_GATE_FAIL_MODE")
    )
    reserve_commit: Annotated[str, _one_of(RESERVE_COMMITS)] = Field(
        "durable", validation_alias=_var("VTAI_RESERVE_COMMIT")
    )
    reserve_ahead: Annotated[bool, BeforeValidator(_on_off)] = Field(
        True, validation_alias=_var("VTAI_RESERVE_AHEAD")
    )
    log_content: Annotated[str, _one_of(LOG_CONTENT_MODES)] = Field(
        "full", validation_alias=_var("VTAI_LOG_CONTENT")
    )
    history: Annotated[bool, BeforeValidator(_on_off)] = Field(
        True, validation_alias=_var("VTAI_HISTORY")
    )

    # --- Accounts -----------------------------------------------------------------------------
    admin_username: Annotated[str, _or_default("admin")] = Field(
        "admin", validation_alias=_var("VTAI_ADMIN_USER")
    )
    # The first admin's password (`make run`); unset, a random one is printed once.
    admin_password: Secret = Field(None, validation_alias=_var("VTAI_ADMIN_PASSWORD"))
    # Signs login sessions; unset, `make run` generates one into the data dir.
    chainlit_auth_secret: Secret = Field(None, validation_alias=_var("CHAINLIT_AUTH_SECRET"))

    # --- Security (docs/security.md) ------------------------------------------------------------
    # Origins besides the app's own that may call it with credentials (CORS, socket.io).
    allowed_origins: Annotated[
        tuple[Annotated[str, AfterValidator(_origin)], ...], NoDecode, BeforeValidator(_items)
    ] = Field((), validation_alias=_var("VTAI_ALLOWED_ORIGINS"))
    # The app's public origin behind a proxy, e.g. https://chat.example.com (return URLs too).
    public_url: Annotated[Text, _optional(_origin)] = Field(
        None, validation_alias=_var("VTAI_PUBLIC_URL")
    )
    # How long a login lasts, in seconds; logout, a password change or a disable end it sooner.
    session_ttl: Annotated[Whole, _at_least(60)] = Field(
        7 * 24 * 3600, validation_alias=_var("VTAI_SESSION_TTL")
    )
    # A chat message (or API message) longer than this is refused before it is stored.
    max_message_chars: Annotated[Whole, _at_least(1)] = Field(
        32_000, validation_alias=_var("VTAI_MAX_MESSAGE_CHARS")
    )
    # An API request body (POST /v1/chat/completions) larger than this is refused with 413.
    max_body_bytes: Annotated[Whole, _at_least(1024)] = Field(
        1_048_576, validation_alias=_var("VTAI_MAX_BODY_BYTES")
    )
    # Seconds a turn keeps running for a client whose socket dropped, waiting for it to return.
    disconnect_grace: Annotated[Whole, _at_least(0)] = Field(
        30, validation_alias=_var("VTAI_DISCONNECT_GRACE")
    )
    # Proxies whose X-Forwarded-For is believed (addresses or CIDR networks).
    trusted_proxies: Annotated[
        tuple[Annotated[str, AfterValidator(_network)], ...], NoDecode, BeforeValidator(_items)
    ] = Field((), validation_alias=_var("VTAI_TRUSTED_PROXIES"))

    # --- Server -------------------------------------------------------------------------------
    # Where `make run` serves the app (vtai.launch passes them to `chainlit run`).
    chainlit_host: Annotated[str, _or_default("127.0.0.1")] = Field(
        "127.0.0.1", validation_alias=_var("CHAINLIT_HOST")
    )
    chainlit_port: Annotated[Whole, _at_least(1), _at_most(65535)] = Field(
        8000, validation_alias=_var("CHAINLIT_PORT")
    )
    # /metrics answers loopback clients only; set, it answers any client that sends
    # `Authorization: Bearer <token>` (and no client without it).
    metrics_token: Secret = Field(None, validation_alias=_var("VTAI_METRICS_TOKEN"))
    # Provider balances on /admin (vtai.admin.balances): seconds between syncs (0: off), and the
    # OpenRouter API's base URL (tests point it at a fake).
    balance_sync_interval: Annotated[Whole, _at_least(0)] = Field(
        3600, validation_alias=_var("VTAI_BALANCE_SYNC_INTERVAL")
    )
    openrouter_base: Annotated[Text, _optional(_http_url)] = Field(
        None, validation_alias=_var("VTAI_OPENROUTER_BASE")
    )
    # The ledger against the bill (vtai.admin.reconcile): a day's drift alerts when it is at
    # least this percent of what the provider charged and at least this many dollars.
    drift_alert_percent: Annotated[Amount, _at_least(0)] = Field(
        Decimal(5), validation_alias=_var("VTAI_DRIFT_ALERT_PERCENT")
    )
    drift_alert_min_usd: Annotated[Amount, _at_least(0)] = Field(
        Decimal("1.00"), validation_alias=_var("VTAI_DRIFT_ALERT_MIN_USD")
    )

    # --- Billing (vtai.billing; docs/billing.md). Off without STRIPE_SECRET_KEY. ----------------
    stripe_secret_key: Secret = Field(None, validation_alias=_var("STRIPE_SECRET_KEY"))
    stripe_webhook_secret: Secret = Field(None, validation_alias=_var("STRIPE_WEBHOOK_SECRET"))
    stripe_prices: Annotated[dict[str, Any], NoDecode, BeforeValidator(_stripe_prices)] = Field(
        default_factory=dict, validation_alias=_var("VTAI_STRIPE_PRICES")
    )
    # Stripe's API base: unset, api.stripe.com; tests point it at localstripe.
    stripe_api_base: Annotated[Text, _optional(_http_url)] = Field(
        None, validation_alias=_var("VTAI_STRIPE_API_BASE")
    )
    billing_grace_days: Annotated[Whole, _at_least(0)] = Field(
        7, validation_alias=_var("VTAI_BILLING_GRACE_DAYS")
    )

    # --- Retention (vtai.retention): prompt and answer text older than N days is purged ------
    content_retention_days: Annotated[
        int | None, BeforeValidator(_whole), _optional(_at_least(1))
    ] = Field(None, validation_alias=_var("VTAI_CONTENT_RETENTION_DAYS"))

    # --- Notices and webhooks (vtai.notify; docs/operations.md) -------------------------------
    # Percents of each cap at which a user is told, once per cap and period (off: none).
    warn_at: Annotated[tuple[int, ...], NoDecode, BeforeValidator(_percents)] = Field(
        (80, 100), validation_alias=_var("VTAI_WARN_AT")
    )
    # Where operator events go (comma-separated), signed with the secret; unset: off.
    webhook_urls: Annotated[
        tuple[Annotated[str, AfterValidator(_http_url)], ...], NoDecode, BeforeValidator(_items)
    ] = Field((), validation_alias=_var("VTAI_WEBHOOK_URLS"))
    webhook_secret: Secret = Field(None, validation_alias=_var("VTAI_WEBHOOK_SECRET"))
    # A spool.backlog event when a spool holds more rows than this, or older than this.
    webhook_spool_rows: Annotated[Whole, _at_least(1)] = Field(
        1000, validation_alias=_var("VTAI_WEBHOOK_SPOOL_ROWS")
    )
    webhook_spool_minutes: Annotated[Whole, _at_least(1)] = Field(
        10, validation_alias=_var("VTAI_WEBHOOK_SPOOL_MINUTES")
    )
    # A balance.low event when a provider's balance (USD) is under this; unset: none.
    webhook_balance_below: Annotated[
        Decimal | None, BeforeValidator(lambda v: _amount(_blank_is_unset(v)))
    ] = Field(None, validation_alias=_var("VTAI_WEBHOOK_BALANCE_BELOW"))

    # --- Accounts: self sign-up and password reset by email (vtai.accounts) ------------------
    signup: Annotated[bool, BeforeValidator(_on_off)] = Field(
        False, validation_alias=_var("VTAI_SIGNUP")
    )
    smtp_host: Text = Field(None, validation_alias=_var("VTAI_SMTP_HOST"))
    smtp_port: Annotated[Whole, _at_least(1), _at_most(65535)] = Field(
        587, validation_alias=_var("VTAI_SMTP_PORT")
    )
    smtp_user: Text = Field(None, validation_alias=_var("VTAI_SMTP_USER"))
    smtp_password: Secret = Field(None, validation_alias=_var("VTAI_SMTP_PASSWORD"))
    smtp_from: Text = Field(None, validation_alias=_var("VTAI_SMTP_FROM"))
    # STARTTLS before login (on for port 587 servers; off for a local relay or a test server).
    smtp_starttls: Annotated[bool, BeforeValidator(_on_off)] = Field(
        True, validation_alias=_var("VTAI_SMTP_STARTTLS")
    )

    # --- Reading the environment ---------------------------------------------------------------

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise SettingsError(_one_line(exc, type(self))) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Settings(...) takes its values as given; from_env() reads the environment.
        return (init_settings,)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, dotenv: bool = True) -> Settings:
        """Settings from `env`; by default from os.environ and then ./.env.

        A variable set in the environment wins over `.env`, even when set empty; a blank value
        is then unset. `env` given, only `env` is read. The `.env` variables the environment
        lacks are exported to os.environ (load_dotenv below) for the libraries that read their
        own: LiteLLM the provider keys, Chainlit its CHAINLIT_*, the `chainlit run` child.
        """
        if env is None:
            found = (load_dotenv(path=DOTENV) or {}) if dotenv else {}
            variables = {**found, **os.environ}
        else:
            variables = dict(env)
        return cls(**_Variables(cls, variables)())

    # --- Rules between fields ---------------------------------------------------------------

    @model_validator(mode="before")
    @classmethod
    def _tier_limits_given(cls, data: Any) -> Any:
        """Settings(tier_limits={...}) as the dataclass took it: the same as the three fields."""
        if isinstance(data, dict) and "tier_limits" in data:
            data = dict(data)
            for tier, value in (data.pop("tier_limits") or {}).items():
                if tier not in LIMIT_VARS:
                    raise _bad(f"tier_limits: {tier!r} is not one of {', '.join(LIMIT_VARS)}")
                data[f"limit_{tier}"] = value
        return data

    @model_validator(mode="wrap")
    @classmethod
    def _rules(cls, data: Any, handler) -> Settings:
        """VTAI_MODEL routes, and Supabase is not half-configured: one line naming the
        variable, never echoing a key. `data` says which variables were set."""
        settings = handler(data)
        given = data if isinstance(data, dict) else {}
        problem = _model_problem(settings.model) if "VTAI_MODEL" in given else None
        if problem:
            raise _bad(f"VTAI_MODEL: {problem}")
        service_var = next(
            (n for n in ("SUPABASE_SERVICE_ROLE_KEY", "SUPABASE_SERVICE_KEY") if n in given),
            "SUPABASE_SERVICE_ROLE_KEY",
        )
        problem = (
            settings._supabase_problem(service_var)
            or settings._billing_problem()
            or settings._webhook_problem()
        )
        if problem:
            raise _bad(problem)
        return settings

    def _webhook_problem(self) -> str | None:
        if self.webhook_urls and self.webhook_secret is None:
            return (
                "VTAI_WEBHOOK_SECRET: webhooks (VTAI_WEBHOOK_URLS) are signed with it: set a long"
                " random string and give it to the receivers"
            )
        return None

    def _billing_problem(self) -> str | None:
        if self.stripe_secret_key is None:
            return None
        if self.stripe_webhook_secret is None:
            return (
                "STRIPE_WEBHOOK_SECRET: billing (STRIPE_SECRET_KEY) needs the webhook's signing "
                "secret (whsec_..., Stripe dashboard -> Developers -> Webhooks)"
            )
        if _reveal(self.stripe_secret_key).startswith("pk_"):
            return "STRIPE_SECRET_KEY holds a publishable key (pk_...): use the secret key (sk_...)"
        return None

    def _supabase_problem(self, service_var: str) -> str | None:
        service = _reveal(self.supabase_service_key)
        anon = _reveal(self.supabase_anon_key)
        if self.supabase_url is None:
            for name, value in ((service_var, service), ("SUPABASE_ANON_KEY", anon)):
                if value:
                    return (
                        f"{name} is set but SUPABASE_URL is not: add the project URL "
                        "(Project Settings -> API) or remove the key"
                    )
            return None
        if service is None and anon is None:
            return (
                "SUPABASE_URL is set without a key: add SUPABASE_SERVICE_ROLE_KEY (metering "
                "over REST) and/or SUPABASE_ANON_KEY (Supabase Auth login), or remove "
                "SUPABASE_URL"
            )
        if service is not None and key_role(service) not in (None, "service_role"):
            return (
                f"{service_var} holds the {key_role(service)} key: use the service_role "
                "(secret) key from Project Settings -> API Keys"
            )
        if anon is not None and key_role(anon) == "service_role":
            return (
                "SUPABASE_ANON_KEY holds the service_role key: put the anon (public) key there "
                "and keep the service_role key in SUPABASE_SERVICE_ROLE_KEY only"
            )
        if self.database_url is None and service is None:
            return (
                "SUPABASE_ANON_KEY: Supabase Auth login needs the project's database for "
                "profiles and usage: set SUPABASE_DB_URL or SUPABASE_SERVICE_ROLE_KEY"
            )
        if self.database_url is None and anon is None:
            return (
                f"{service_var}: metering over REST (no database URL) needs SUPABASE_ANON_KEY "
                "for login, since passwords then live in Supabase Auth; or set SUPABASE_DB_URL"
            )
        return None

    # --- What the rest of the code asks --------------------------------------------------------

    @property
    def tier_limits(self) -> dict[str, int]:
        """The limits set, by tier; a tier left out keeps the migration's default."""
        limits = {tier: getattr(self, f"limit_{tier}") for tier in LIMIT_VARS}
        return {tier: value for tier, value in limits.items() if value is not None}

    @property
    def rest_metering(self) -> bool:
        """Metering over Supabase's REST API: a service key and no database URL.

        A database URL wins when both are set: one round trip per call, transactions, and no
        REST gateway in between (docs/supabase.md).
        """
        return (
            self.database_url is None
            and self.supabase_url is not None
            and self.supabase_service_key is not None
        )

    @property
    def embedded(self) -> bool:
        return self.database_url is None and not self.rest_metering

    @property
    def supabase_auth(self) -> bool:
        """Password logins go to Supabase Auth rather than VT.ai's own credential store."""
        return self.supabase_url is not None and self.supabase_anon_key is not None

    @property
    def billing(self) -> bool:
        """Stripe billing is on (vtai.billing): a secret key is set."""
        return self.stripe_secret_key is not None

    @property
    def email(self) -> bool:
        """Mail can be sent (password reset): an SMTP host and a From address are set."""
        return self.smtp_host is not None and self.smtp_from is not None

    @property
    def spool_dir(self) -> Path:
        return (self.process_dir or self.data_dir).resolve() / "spool"

    @property
    def provider_keys(self) -> dict[str, SecretStr]:
        """The provider keys set, by variable (Chainlit's CI placeholder key is not a key)."""
        return _provider_keys({var: getattr(self, var.lower()) for var in PROVIDER_KEY_VARS})

    def __repr_args__(self):
        # The database URL's password stays out of repr() too (the keys are SecretStr).
        for name, value in super().__repr_args__():
            yield name, _hide_password(value) if name == "database_url" and value else value


class _Variables(EnvSettingsSource):
    """Settings' fields from one mapping of variables, by the names the fields declare.

    pydantic-settings' own environment source, reading `variables` instead of os.environ.
    A blank value is unset, as an unset variable, so the next name in a field's list counts.
    """

    def __init__(self, settings_cls: type[BaseSettings], variables: Mapping[str, str]):
        self._variables = variables
        super().__init__(settings_cls, case_sensitive=True)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {k: v for k, v in self._variables.items() if isinstance(v, str) and v.strip()}

    def __call__(self) -> dict[str, Any]:
        data = super().__call__()
        # pydantic-settings files a value under the field's first variable; file it under the
        # one that is set (SUPABASE_DB_URL, SUPABASE_SERVICE_KEY), so that an error names it.
        for field in self.settings_cls.model_fields.values():
            alias = field.validation_alias
            if isinstance(alias, AliasChoices) and alias.choices[0] in data:
                used = next((c for c in alias.choices if c in self.env_vars), alias.choices[0])
                data[used] = data.pop(alias.choices[0])
        return data


def _reveal(secret: SecretStr | None) -> str | None:
    return None if secret is None else secret.get_secret_value()


def _hide_password(url: str) -> str:
    try:
        password = urlsplit(url).password
    except ValueError:
        return url
    return url.replace(f":{password}@", ":***@") if password else url


def _variable(cls: type[Settings], name: str) -> str:
    """The environment variable of a field (by name or by one of its variables)."""
    field = cls.model_fields.get(name)
    if field is None:
        return name
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return alias if isinstance(alias, str) else name


def _one_line(exc: ValidationError, cls: type[Settings]) -> str:
    error = exc.errors(include_url=False)[0]
    message = " ".join(str(error["msg"]).split())
    if not error["loc"]:
        return message  # a rule between fields: its message names the variables
    return f"{_variable(cls, str(error['loc'][0]))}: {message}"


def load_dotenv(*, path: str | os.PathLike = DOTENV) -> dict[str, str]:
    """The variables in `path` (pydantic-settings' reader), exported to os.environ where unset.

    As python-dotenv's load_dotenv(override=False): for the libraries that read their own
    variables (LiteLLM the provider keys, Chainlit its CHAINLIT_*, the `chainlit run` child).
    """
    source = DotEnvSettingsSource(Settings, env_file=path, case_sensitive=True)
    found = {k: v for k, v in source.env_vars.items() if v is not None}
    for name, value in found.items():
        os.environ.setdefault(name, value)
    return found


def _provider_keys(values: Mapping[str, Any]) -> dict[str, SecretStr]:
    keys = {}
    for var in PROVIDER_KEY_VARS:
        key = _blank_is_unset(values.get(var))
        if key is not None and key != CHAINLIT_FAKE_OPENAI_KEY:
            keys[var] = SecretStr(key)
    return keys


def provider_keys(env: Mapping[str, str] | None = None) -> dict[str, SecretStr]:
    """Settings.provider_keys of `env` (default: this process's environment, as it is now).

    Reads only the four provider-key variables, so it is cheap enough for every turn (a turn
    runs only a model the picker offers); a Settings build takes about a millisecond. `.env`
    is in os.environ once load_settings() has run, as it has at start-up.
    """
    return _provider_keys(os.environ if env is None else env)


def load_settings(env: Mapping[str, str] | None = None, dotenv: bool = True) -> Settings:
    """Build Settings from `env` (default: os.environ, then `./.env` unless dotenv=False)."""
    return Settings.from_env(env, dotenv)
