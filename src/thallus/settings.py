"""One typed settings object, read from ``THALLUS_*`` variables, validated at start-up.

Three environment profiles (SYSTEM.md §6) decide the defaults and how strict start-up is:

* ``development`` — lenient: local dev-server origins allowed by default, no secret needed,
  plain-http cookies, CSRF lets requests without any origin evidence through (curl, scripts);
* ``test`` — refuses a missing secret or an empty origin allowlist;
* ``production`` — additionally refuses ``http://`` origins, a missing ``THALLUS_PUBLIC_ORIGIN``
  and debug mode, and turns HSTS on.

Every refusal names the variable and the reason in one line (:func:`describe_errors`), like
Django's ``check --deploy`` made fatal. An optional TOML file (``THALLUS_CONFIG_FILE``) supplies
values that environment variables override.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from thallus import headers
from thallus.origins import InvalidOriginError, parse_origin, parse_origins

Environment = Literal["development", "test", "production"]

ENV_PREFIX = "THALLUS_"
CONFIG_FILE_VARIABLE = "THALLUS_CONFIG_FILE"
MIN_SECRET_LENGTH = 32
#: OWASP Password Storage Cheat Sheet's floor for Argon2id (19 MiB, t=2, p=1).
MIN_ARGON2_MEMORY_KIB = 19456
DEVELOPMENT_ORIGINS = (
    "http://localhost:3000",
    "http://localhost:5173",
    "http://127.0.0.1:3000",
    "http://127.0.0.1:5173",
)
#: The refresh cookie's path in every environment (SYSTEM.md §6): sent only to the auth endpoints.
AUTH_PATH = "/api/v1/auth"

_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 §5.6.2 token
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

CommaList = Annotated[tuple[str, ...], NoDecode]


class ConfigurationError(ValueError):
    """Settings that must not start: each line of :attr:`problems` names a variable and a reason."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class _RefusalError(ValueError):
    """A cross-field refusal raised inside validation, carrying the variable it concerns."""

    def __init__(self, variable: str, reason: str) -> None:
        super().__init__(f"{variable}: {reason}")
        self.variable = variable
        self.reason = reason


#: The refresh cookie's name. Outside development it carries the ``__Secure-`` prefix (RFC 6265bis
#: §4.1.3.1): a browser accepts such a cookie only with ``Secure`` from an https origin, so a
#: plain-http page or a network attacker cannot plant or overwrite it.
REFRESH_COOKIE = "thallus_refresh"
SECURE_REFRESH_COOKIE = "__Secure-" + REFRESH_COOKIE


@dataclass(frozen=True, slots=True)
class CookiePolicy:
    """Name and attributes of the session (refresh) cookie for an environment (SYSTEM.md §6)."""

    name: str
    secure: bool
    same_site: Literal["Lax", "Strict"]
    path: str
    http_only: bool = True


def _default_data_dir() -> Path:
    """``$XDG_DATA_HOME/thallus`` (``~/.local/share/thallus``): the same file whatever the working directory."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "thallus"


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


class Settings(BaseSettings):
    """Every knob of Thallus. Field ``x`` is read from ``THALLUS_X``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore", case_sensitive=False)

    env: Environment = Field("development", description="development, test or production")
    debug: bool = Field(False, description="debug mode; refused in production")
    public_origin: str | None = Field(
        None, description="the service's own origin, scheme://host[:port]; required in production"
    )
    allowed_origins: Annotated[tuple[str, ...] | None, NoDecode] = Field(
        None, description="comma-separated CORS allowlist; also the CSRF trusted origins"
    )
    secret_key: SecretStr | None = Field(None, description=f"at least {MIN_SECRET_LENGTH} characters")

    cors_extra_headers: CommaList = Field((), description="request headers allowed beyond the four defaults")
    cors_max_age: int = Field(600, ge=0, le=86400, description="seconds a browser may cache a preflight")

    xss_protection: Literal["0", "1", "1; mode=block"] = "1; mode=block"
    referrer_policy: str = "strict-origin-when-cross-origin"
    hsts_max_age: int = Field(31536000, ge=0)
    hsts_include_subdomains: bool = False
    hsts_preload: bool = False
    permissions_policy: str | None = Field(None, description="full header value; empty turns it off")
    cross_origin_opener_policy: str = "same-origin"
    cross_origin_resource_policy: str = "same-site"
    x_permitted_cross_domain_policies: str = "none"

    csp_enabled: bool = True
    csp_report_only: bool = False
    csp_report_uri: str | None = None
    csp_extra_sources: str = Field(
        "", description="extra sources per directive, CSP syntax: 'img-src data:; connect-src https://x'"
    )

    no_store_paths: CommaList = Field((AUTH_PATH,), description="path prefixes answered with Cache-Control: no-store")
    max_body_bytes: int = Field(1024 * 1024, ge=0, description="largest request body; more is a 413")
    body_timeout: float = Field(30.0, gt=0, le=3600, description="seconds a body may pause before a 408")
    header_timeout: float = Field(
        10.0, gt=0, le=600, description="thallus serve: seconds for a request's headers to arrive"
    )
    keep_alive_timeout: int = Field(5, ge=1, le=600, description="thallus serve: seconds an idle connection stays")
    max_connections: int = Field(
        1000, ge=1, le=1_000_000, description="thallus serve: open connections per worker; more get a 503"
    )
    max_connections_per_client: int = Field(
        100, ge=0, le=1_000_000, description="thallus serve: open connections per client network; 0: no cap"
    )
    body_min_rate: int = Field(
        500, ge=0, description="bytes/s a body must average once it has taken THALLUS_BODY_TIMEOUT; 0: no minimum"
    )
    route_max_body_bytes: Annotated[dict[str, int], NoDecode] = Field(
        default_factory=dict, description="per-route body limits: '/path=bytes,/prefix*=bytes'"
    )
    log_level: str = "INFO"

    data_dir: Path = Field(default_factory=_default_data_dir, description="where the SQLite file lives")
    database_url: str | None = Field(None, description="sqlalchemy URL; default: SQLite in THALLUS_DATA_DIR")
    previous_secret_keys: Annotated[tuple[SecretStr, ...], NoDecode] = Field(
        (), description="comma-separated earlier secrets: their tokens and keys stay valid during rotation"
    )
    registration_enabled: bool = Field(True, description="whether POST /api/v1/auth/register is open")
    docs_enabled: bool = Field(True, description="whether /docs and /openapi.json are served")
    refresh_token_ttl: int = Field(30 * 86400, ge=300, description="seconds a login (refresh-token family) lives")
    session_inactivity_timeout: int = Field(
        86400, ge=60, description="seconds without a refresh after which a session ends"
    )
    rate_limit_enabled: bool = Field(True, description="per-IP request limits")
    rate_limit: str = Field("120/minute", description="general per-IP limit, limits notation")
    rate_limit_auth: str = Field("10/minute", description="per-IP limit on the authentication endpoints")
    rate_limit_auth_paths: CommaList = Field((AUTH_PATH,), description="path prefixes under the auth limit")
    rate_limit_exempt_paths: CommaList = Field(("/health", "/metrics"), description="paths never limited")
    trusted_proxies: CommaList = Field((), description="IPs/CIDRs whose forwarding header is believed")
    proxy_header: Literal["x-forwarded-for", "forwarded"] = Field(
        "x-forwarded-for", description="the one forwarding header read from a trusted proxy; the other is ignored"
    )
    rate_limit_ipv4_prefix: int = Field(32, ge=1, le=32, description="IPv4 clients are counted per this network")
    rate_limit_ipv6_prefix: int = Field(64, ge=1, le=128, description="IPv6 clients are counted per this network")
    redis_url: str | None = Field(None, description="redis://host:port/db: limits and lockouts across instances")
    redis_key_prefix: str = Field("thallus", description="prefix of every Redis key")
    lockout_threshold: int = Field(5, ge=1, description="consecutive failed logins before a lock")
    lockout_steps: Annotated[tuple[int, ...], NoDecode] = Field(
        (900, 1800, 3600, 7200), description="lock durations in seconds, the last repeating"
    )
    audit_enabled: bool = Field(True, description="persist the audit log (else audit events are only logged)")
    audit_journal_dir: Path | None = Field(None, description="spill journal; default THALLUS_DATA_DIR/audit-journal")
    audit_queue_size: int = Field(10_000, ge=1, description="records held in memory before spilling")
    audit_batch_size: int = Field(500, ge=1, le=10_000, description="records written per transaction")
    audit_write_timeout: float = Field(5.0, gt=0, description="seconds before a slow write spills")
    argon2_time_cost: int = Field(3, ge=1)
    argon2_memory_cost: int = Field(65536, ge=8, description="KiB")
    argon2_parallelism: int = Field(4, ge=1)
    password_hash_concurrency: int | None = Field(
        None, ge=1, le=1024, description="Argon2 operations at once per process; default two per CPU"
    )
    password_hash_max_wait: float = Field(
        5.0, gt=0, le=60, description="seconds a request waits for a hashing slot before a 503"
    )

    # -- parsing -------------------------------------------------------------------------

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_FILE_VARIABLE)
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)

    @model_validator(mode="before")
    @classmethod
    def _profile_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        env = data.get("env")
        if isinstance(env, str):
            env = env.strip().lower()
            data["env"] = env
        if data.get("allowed_origins") is None and (env is None or env == "development"):
            data["allowed_origins"] = DEVELOPMENT_ORIGINS
        return data

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _parse_allowed_origins(cls, value: Any) -> Any:
        value = _split_commas(value)
        if isinstance(value, (list, tuple)):
            return parse_origins([str(item) for item in value])
        return value

    @field_validator("public_origin", mode="before")
    @classmethod
    def _parse_public_origin(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_origin(value) if value.strip() else None
        return value

    @field_validator("cors_extra_headers", mode="before")
    @classmethod
    def _parse_header_names(cls, value: Any) -> Any:
        value = _split_commas(value)
        if isinstance(value, (list, tuple)):
            for name in value:
                if not _HEADER_NAME.fullmatch(str(name)):
                    raise ValueError(f"{name!r} is not a valid header name")
        return value

    @field_validator("no_store_paths", mode="before")
    @classmethod
    def _parse_paths(cls, value: Any) -> Any:
        value = _split_commas(value)
        if isinstance(value, (list, tuple)):
            for path in value:
                if not str(path).startswith("/"):
                    raise ValueError(f"{path!r} must start with '/'")
        return value

    @field_validator("route_max_body_bytes", mode="before")
    @classmethod
    def _parse_route_limits(cls, value: Any) -> Any:
        if isinstance(value, str):
            limits: dict[str, int] = {}
            for item in _split_commas(value):
                path, _, size = item.partition("=")
                path, size = path.strip(), size.strip()
                if not path.startswith("/") or not size.isdigit():
                    raise ValueError(f"{item!r} is not '/path=bytes' (or '/prefix*=bytes')")
                limits[path] = int(size)
            return limits
        return value

    @field_validator("previous_secret_keys", mode="before")
    @classmethod
    def _parse_previous_secrets(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip()
        if not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://", "postgresql://", "postgres://")):
            raise ValueError("use sqlite+aiosqlite:///path or postgresql+asyncpg://user@host/db")
        if value.startswith(("postgresql://", "postgres://")):
            value = "postgresql+asyncpg://" + value.split("://", 1)[1]
        return value

    @field_validator("rate_limit", "rate_limit_auth")
    @classmethod
    def _check_rate_limit(cls, value: str) -> str:
        from thallus.ratelimit import parse_limit

        parse_limit(value)
        return value

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _check_proxies(cls, value: Any) -> Any:
        from thallus.ratelimit import parse_networks

        value = _split_commas(value)
        if isinstance(value, (list, tuple)):
            parse_networks([str(item) for item in value])
        return value

    @field_validator("lockout_steps", mode="before")
    @classmethod
    def _parse_steps(cls, value: Any) -> Any:
        value = _split_commas(value)
        if isinstance(value, (list, tuple)):
            if not value:
                raise ValueError("needs at least one duration")
            try:
                steps = tuple(int(step) for step in value)
            except (TypeError, ValueError):
                raise ValueError("must be whole seconds, e.g. 900,1800,3600,7200") from None
            if any(step <= 0 for step in steps):
                raise ValueError("durations must be positive")
            return steps
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not value.strip().startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("use redis://host:port/db or rediss://…")
        return value.strip()

    @field_validator("rate_limit_auth_paths", "rate_limit_exempt_paths", mode="before")
    @classmethod
    def _parse_rate_paths(cls, value: Any) -> Any:
        return cls._parse_paths(value)

    @field_validator("proxy_header", mode="before")
    @classmethod
    def _parse_proxy_header(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _parse_log_level(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().upper()
            if value not in _LOG_LEVELS:
                raise ValueError(f"must be one of {', '.join(_LOG_LEVELS)}")
        return value

    @field_validator("referrer_policy")
    @classmethod
    def _check_referrer_policy(cls, value: str) -> str:
        return headers.validate_referrer_policy(value)

    @field_validator("permissions_policy")
    @classmethod
    def _check_permissions_policy(cls, value: str | None) -> str | None:
        return None if value is None else headers.validate_permissions_policy(value)

    @field_validator("cross_origin_opener_policy", "cross_origin_resource_policy", "x_permitted_cross_domain_policies")
    @classmethod
    def _check_isolation_header(cls, value: str, info: ValidationInfo) -> str:
        return headers.validate_isolation_value(str(info.field_name), value)

    @field_validator("csp_extra_sources")
    @classmethod
    def _check_csp_sources(cls, value: str) -> str:
        headers.parse_csp_sources(value)
        return value

    @field_validator("csp_report_uri")
    @classmethod
    def _check_report_uri(cls, value: str | None) -> str | None:
        return None if value is None else headers.validate_report_uri(value)

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Settings:
        if self.hsts_preload and (not self.hsts_include_subdomains or self.hsts_max_age < 31536000):
            raise _RefusalError(
                "THALLUS_HSTS_PRELOAD",
                "preload needs THALLUS_HSTS_INCLUDE_SUBDOMAINS=true and a max-age of a year or more",
            )
        if self.env == "development":
            return self
        if self.argon2_memory_cost < MIN_ARGON2_MEMORY_KIB:
            raise _RefusalError(
                "THALLUS_ARGON2_MEMORY_COST",
                f"must be at least {MIN_ARGON2_MEMORY_KIB} KiB outside development (OWASP)",
            )
        secret = self.secret_key.get_secret_value() if self.secret_key else ""
        if not secret:
            raise _RefusalError("THALLUS_SECRET_KEY", f"is required in {self.env}")
        if len(secret) < MIN_SECRET_LENGTH:
            raise _RefusalError("THALLUS_SECRET_KEY", f"must be at least {MIN_SECRET_LENGTH} characters in {self.env}")
        if not self.allowed_origins:
            raise _RefusalError("THALLUS_ALLOWED_ORIGINS", f"must list the allowed origins in {self.env}")
        if self.env == "test":
            return self
        if self.debug:
            raise _RefusalError("THALLUS_DEBUG", "debug mode is refused in production")
        if self.public_origin is None:
            raise _RefusalError("THALLUS_PUBLIC_ORIGIN", "is required in production (the service's own https origin)")
        if not self.public_origin.startswith("https://"):
            raise _RefusalError(
                "THALLUS_PUBLIC_ORIGIN", f"{self.public_origin!r} is not https; production serves https only"
            )
        for origin in self.allowed_origins:
            if not origin.startswith("https://"):
                raise _RefusalError(
                    "THALLUS_ALLOWED_ORIGINS", f"{origin!r} is not https; production allows https origins only"
                )
        return self

    # -- loading ----------------------------------------------------------------------------

    @classmethod
    def load(cls, **overrides: Any) -> Settings:
        """Read settings from the environment (and config file); raise :class:`ConfigurationError`."""
        try:
            return cls(**overrides)
        except ValidationError as exc:
            raise ConfigurationError(describe_errors(exc)) from None
        except (OSError, ValueError) as exc:  # unreadable or malformed TOML file
            raise ConfigurationError([f"{CONFIG_FILE_VARIABLE}: {exc}"]) from None

    # -- derived policy ---------------------------------------------------------------------

    @property
    def effective_database_url(self) -> str:
        """``THALLUS_DATABASE_URL``, or the embedded SQLite file in ``THALLUS_DATA_DIR``."""
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'thallus.db'}"

    @property
    def effective_audit_journal_dir(self) -> Path:
        return self.audit_journal_dir or self.data_dir / "audit-journal"

    @property
    def origins(self) -> tuple[str, ...]:
        """The CORS allowlist (never ``None`` after validation)."""
        return self.allowed_origins or ()

    @property
    def trusted_origins(self) -> tuple[str, ...]:
        """Origins whose requests pass the CSRF check: the public origin and the allowlist."""
        own = (self.public_origin,) if self.public_origin else ()
        return tuple(dict.fromkeys(own + self.origins))

    @property
    def csrf_requires_origin_evidence(self) -> bool:
        """Whether a checked request with no Sec-Fetch-Site, Origin or Referer is refused (§5 rule 4)."""
        return self.env != "development"

    @property
    def expose_error_details(self) -> bool:
        """Whether a 500 names the exception (development only, SYSTEM.md §6)."""
        return self.env == "development"

    @property
    def hsts_enabled(self) -> bool:
        return self.env == "production" and self.hsts_max_age > 0

    @property
    def cookie_policy(self) -> CookiePolicy:
        if self.env == "development":
            return CookiePolicy(REFRESH_COOKIE, secure=False, same_site="Lax", path=AUTH_PATH)
        return CookiePolicy(SECURE_REFRESH_COOKIE, secure=True, same_site="Strict", path=AUTH_PATH)


def variable_name(field: str) -> str:
    """``allowed_origins`` → ``THALLUS_ALLOWED_ORIGINS``."""
    return ENV_PREFIX + field.upper()


def describe_errors(exc: ValidationError) -> list[str]:
    """One line per problem: ``THALLUS_VARIABLE: reason``."""
    lines = []
    for error in exc.errors():
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, _RefusalError):
            lines.append(f"{cause.variable}: {cause.reason}")
            continue
        field = next((str(part) for part in error["loc"] if isinstance(part, str)), None)
        reason = str(cause) if isinstance(cause, (InvalidOriginError, ValueError)) else error["msg"]
        lines.append(f"{variable_name(field)}: {reason}" if field else reason)
    return lines
