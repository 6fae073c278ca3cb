"""The reference service's settings: the layers' (:class:`thallus.settings.Settings`) and its own.

On top of the layers' profiles (docs/design.md §6), the service refuses to start outside
development without a secret of at least 32 characters and an origin allowlist, and in production
additionally without an https ``THALLUS_PUBLIC_ORIGIN``, with debug mode, or with an Argon2 memory
cost under OWASP's floor. Every refusal is reported in the same run as every other problem.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from thallus.settings import AUTH_PATH, CommaList, Refusal, Settings, split_commas

MIN_SECRET_LENGTH = 32
#: OWASP Password Storage Cheat Sheet's floor for Argon2id (19 MiB, t=2, p=1).
MIN_ARGON2_MEMORY_KIB = 19456
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

#: The refresh cookie's name. Outside development it carries the ``__Secure-`` prefix (RFC 6265bis
#: §4.1.3.1): a browser accepts such a cookie only with ``Secure`` from an https origin, so a
#: plain-http page or a network attacker cannot plant or overwrite it.
REFRESH_COOKIE = "thallus_refresh"
SECURE_REFRESH_COOKIE = "__Secure-" + REFRESH_COOKIE


@dataclass(frozen=True, slots=True)
class CookiePolicy:
    """Name and attributes of the session (refresh) cookie for an environment (docs/design.md §6)."""

    name: str
    secure: bool
    same_site: Literal["Lax", "Strict"]
    path: str
    http_only: bool = True


def _default_data_dir() -> Path:
    """``$XDG_DATA_HOME/thallus`` (``~/.local/share/thallus``): the same file whatever the working directory."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "thallus"


class ServiceSettings(Settings):
    """Every knob of ``thallus serve``: the layers' and the service's."""

    debug: bool = Field(False, description="debug mode; refused in production")
    secret_key: SecretStr | None = Field(None, description=f"at least {MIN_SECRET_LENGTH} characters")
    previous_secret_keys: Annotated[tuple[SecretStr, ...], NoDecode] = Field(
        (), description="comma-separated earlier secrets: their tokens and keys stay valid during rotation"
    )
    log_level: str = "INFO"
    rate_limit_exempt_paths: CommaList = Field(
        ("/health", "/ready", "/metrics"), description="paths never limited: the probes and the scrape"
    )

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

    data_dir: Path = Field(default_factory=_default_data_dir, description="where the SQLite file lives")
    database_url: str | None = Field(None, description="sqlalchemy URL; default: SQLite in THALLUS_DATA_DIR")
    registration_enabled: bool = Field(True, description="whether POST /api/v1/auth/register is open")
    docs_enabled: bool = Field(True, description="whether /docs and /openapi.json are served")
    refresh_token_ttl: int = Field(30 * 86400, ge=300, description="seconds a login (refresh-token family) lives")
    session_inactivity_timeout: int = Field(
        86400, ge=60, description="seconds without a refresh after which a session ends"
    )
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
    metrics_access: Literal["off", "loopback", "token"] = Field(
        "loopback",
        description="who may read /metrics: nobody (404), TCP peers on loopback, or holders of THALLUS_METRICS_TOKEN",
    )
    metrics_token: SecretStr | None = Field(
        None, description=f"the bearer token /metrics asks for with metrics_access=token (≥ {MIN_SECRET_LENGTH} chars)"
    )

    @field_validator("previous_secret_keys", mode="before")
    @classmethod
    def _parse_previous_secrets(cls, value: Any) -> Any:
        return split_commas(value)

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

    @field_validator("lockout_steps", mode="before")
    @classmethod
    def _parse_steps(cls, value: Any) -> Any:
        value = split_commas(value)
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

    @field_validator("metrics_access", mode="before")
    @classmethod
    def _parse_metrics_access(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _parse_log_level(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().upper()
            if value not in _LOG_LEVELS:
                raise ValueError(f"must be one of {', '.join(_LOG_LEVELS)}")
        return value

    def refusals(self) -> list[Refusal]:
        """The layers' refusals, then the service's (docs/design.md §6 start-up row)."""
        refusals = super().refusals()
        if self.metrics_access == "token":  # in every environment: the endpoint cannot be served without it
            token = self.metrics_token.get_secret_value() if self.metrics_token else ""
            if len(token) < MIN_SECRET_LENGTH:
                problem = f"must be at least {MIN_SECRET_LENGTH} characters with THALLUS_METRICS_ACCESS=token"
                refusals.append(("metrics_token", problem))
        if self.env == "development":
            return refusals
        if self.argon2_memory_cost < MIN_ARGON2_MEMORY_KIB:
            refusals.append(
                ("argon2_memory_cost", f"must be at least {MIN_ARGON2_MEMORY_KIB} KiB outside development (OWASP)")
            )
        secret = self.secret_key.get_secret_value() if self.secret_key else ""
        if not secret:
            refusals.append(("secret_key", f"is required in {self.env}"))
        elif len(secret) < MIN_SECRET_LENGTH:
            refusals.append(("secret_key", f"must be at least {MIN_SECRET_LENGTH} characters in {self.env}"))
        if not self.origins:
            refusals.append(("allowed_origins", f"must list the allowed origins in {self.env}"))
        if self.env == "test":
            return refusals
        if self.debug:
            refusals.append(("debug", "debug mode is refused in production"))
        if self.public_origin is None:
            refusals.append(("public_origin", "is required in production (the service's own https origin)"))
        return refusals

    # -- derived policy ---------------------------------------------------------------------

    @property
    def effective_database_url(self) -> str:
        """``THALLUS_DATABASE_URL``, or the embedded SQLite file in ``THALLUS_DATA_DIR``."""
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'thallus.db'}"

    @property
    def effective_audit_journal_dir(self) -> Path:
        return self.audit_journal_dir or self.data_dir / "audit-journal"

    @property
    def cookie_policy(self) -> CookiePolicy:
        if self.env == "development":
            return CookiePolicy(REFRESH_COOKIE, secure=False, same_site="Lax", path=AUTH_PATH)
        return CookiePolicy(SECURE_REFRESH_COOKIE, secure=True, same_site="Strict", path=AUTH_PATH)
