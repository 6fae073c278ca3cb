"""The layers' settings: one typed object, read from ``THALLUS_*`` variables, validated at start-up.

These are only the knobs of the layers ``protect()`` composes (headers, CORS, CSRF, correlation ID,
errors, body limit, rate limit); the reference service's settings
(:class:`thallus.server.settings.ServiceSettings`) build on them. Three environment profiles
(docs/design.md §6) decide the defaults and how strict start-up is:

* ``development`` — lenient: local dev-server origins allowed by default, CSRF lets requests without
  any origin evidence through (curl, scripts), 500s name the exception;
* ``test`` — CSRF refuses requests without origin evidence; an unset allowlist means no
  cross-origin access at all (the layers need no allowlist);
* ``production`` — additionally refuses ``http://`` origins and turns HSTS on.

**Where values come from**, first wins: keyword arguments, ``THALLUS_*`` environment variables, a
``.env`` file (``THALLUS_ENV_FILE``, default ``.env`` in the working directory; empty: none), a TOML
file (``THALLUS_CONFIG_FILE``). An unknown keyword argument is an error (a misspelt keyword must
not silently leave a default in force); unknown variables are ignored, since the service's and
other programs' share the prefix.

**Every problem at once**: :class:`ConfigurationError` lists each one in a line — field errors and
cross-field refusals together — naming the keyword when it came from a keyword argument and the
variable otherwise, like Django's ``check --deploy`` made fatal.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from thallus import headers
from thallus.correlation import HEADER as CORRELATION_HEADER
from thallus.cors import ALLOWED_METHODS, EXPOSED_HEADERS, allowed_methods, exposed_headers
from thallus.origins import InvalidOriginError, parse_origin, parse_origins

Environment = Literal["development", "test", "production"]

ENV_PREFIX = "THALLUS_"
CONFIG_FILE_VARIABLE = "THALLUS_CONFIG_FILE"
ENV_FILE_VARIABLE = "THALLUS_ENV_FILE"
DEFAULT_ENV_FILE = ".env"
DEVELOPMENT_ORIGINS = (
    "http://localhost:3000",
    "http://localhost:5173",
    "http://127.0.0.1:3000",
    "http://127.0.0.1:5173",
)
#: The reference service's authentication endpoints: under the auth rate limit and answered with
#: ``Cache-Control: no-store`` by default (the refresh cookie's path, docs/design.md §6).
AUTH_PATH = "/api/v1/auth"

_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 §5.6.2 token

CommaList = Annotated[tuple[str, ...], NoDecode]


class ConfigurationError(ValueError):
    """Settings that must not start: each line of :attr:`problems` names a variable and a reason."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


#: A cross-field refusal: the field it concerns and the reason.
Refusal = tuple[str, str]


class SourceError(Exception):
    """A source of values that cannot be read: the variable that names it, and why."""

    def __init__(self, variable: str, reason: str) -> None:
        super().__init__(f"{variable}: {reason}")
        self.variable = variable
        self.reason = reason


class _RefusalsError(ValueError):
    """Every cross-field refusal of one configuration, raised once from validation."""

    def __init__(self, refusals: list[Refusal]) -> None:
        super().__init__("; ".join(f"{field}: {reason}" for field, reason in refusals))
        self.refusals = refusals


def split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


class Settings(BaseSettings):
    """The layers' knobs. Field ``x`` is read from ``THALLUS_X`` (or given as keyword ``x``)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore", case_sensitive=False)

    env: Environment = Field("development", description="development, test or production")
    public_origin: str | None = Field(
        None, description="the application's own origin, scheme://host[:port]: trusted by CSRF"
    )
    allowed_origins: Annotated[tuple[str, ...] | None, NoDecode] = Field(
        None,
        description="comma-separated CORS allowlist, also trusted by CSRF; https://*.example.com for one "
        "subdomain label; default: the local dev servers in development, none otherwise",
    )

    cors_extra_headers: CommaList = Field((), description="request headers allowed beyond the four defaults")
    cors_allow_methods: CommaList = Field(
        ALLOWED_METHODS, description="methods a preflight allows (Access-Control-Allow-Methods)"
    )
    cors_expose_headers: CommaList = Field(
        EXPOSED_HEADERS, description="response headers an allowed origin may read (Access-Control-Expose-Headers)"
    )
    cors_max_age: int = Field(600, ge=0, le=86400, description="seconds a browser may cache a preflight")

    csrf_exempt_paths: CommaList = Field(
        (), description="exact paths the CSRF check skips (webhooks with their own signature check)"
    )
    correlation_header: str = Field(
        CORRELATION_HEADER, description="the request and response header carrying the correlation ID"
    )

    xss_protection: Literal["0", "1", "1; mode=block"] = "1; mode=block"
    x_frame_options: Literal["DENY", "SAMEORIGIN"] = Field("DENY", description="DENY or SAMEORIGIN")
    referrer_policy: str = "strict-origin-when-cross-origin"
    hsts_max_age: int = Field(31536000, ge=0)
    hsts_include_subdomains: bool = False
    hsts_preload: bool = False
    permissions_policy: str | None = Field(None, description="full header value; empty turns it off")
    cross_origin_opener_policy: str = "same-origin"
    cross_origin_resource_policy: str = "same-site"
    cross_origin_embedder_policy: str | None = Field(
        None, description="opt-in: require-corp or credentialless (breaks cross-origin embeds without CORP/CORS)"
    )
    x_permitted_cross_domain_policies: str = "none"

    csp_enabled: bool = True
    csp_report_only: bool = False
    csp_report_uri: str | None = None
    csp_extra_sources: str = Field(
        "", description="extra sources per directive, CSP syntax: 'img-src data:; connect-src https://x'"
    )

    no_store_paths: CommaList = Field((AUTH_PATH,), description="path prefixes answered with Cache-Control: no-store")
    max_body_bytes: int = Field(1024 * 1024, ge=0, description="largest request body; more is a 413")
    route_max_body_bytes: Annotated[dict[str, int], NoDecode] = Field(
        default_factory=dict, description="per-route body limits: '/path=bytes,/prefix*=bytes'"
    )
    body_timeout: float = Field(30.0, gt=0, le=3600, description="seconds a body may pause before a 408")
    body_min_rate: int = Field(
        500, ge=0, description="bytes/s a body must average once it has taken THALLUS_BODY_TIMEOUT; 0: no minimum"
    )

    rate_limit_enabled: bool = Field(True, description="per-IP request limits")
    rate_limit: str = Field("120/minute", description="general per-IP limit, limits notation")
    rate_limit_auth: str = Field("10/minute", description="per-IP limit on the authentication endpoints")
    rate_limit_auth_paths: CommaList = Field((AUTH_PATH,), description="path prefixes under the auth limit")
    rate_limit_exempt_paths: CommaList = Field(("/health", "/metrics"), description="paths never limited")
    rate_limit_ipv4_prefix: int = Field(32, ge=1, le=32, description="IPv4 clients are counted per this network")
    rate_limit_ipv6_prefix: int = Field(64, ge=1, le=128, description="IPv6 clients are counted per this network")
    trusted_proxies: CommaList = Field((), description="IPs/CIDRs whose forwarding header is believed")
    proxy_header: Literal["x-forwarded-for", "forwarded"] = Field(
        "x-forwarded-for", description="the one forwarding header read from a trusted proxy; the other is ignored"
    )
    redis_url: str | None = Field(None, description="redis://host:port/db: limits shared by every instance")
    redis_key_prefix: str = Field("thallus", description="prefix of every Redis key")

    def __init__(self, **values: Any) -> None:
        """Validate ``values`` (keyword arguments) over the environment; every problem at once.

        Raises :class:`ConfigurationError`. A field that fails is validated again at its default so
        that the cross-field refusals of the rest are reported in the same run.
        """
        keywords = frozenset(name for name in values if not name.startswith("_"))
        problems = unknown_keywords(type(self), keywords)
        try:
            super().__init__(**values)
        except ValidationError as exc:
            described = _described(exc, keywords)
            problems += [line for _, line, _ in described]
            failed = {field for field, _, refusal in described if field and not refusal}
            if failed:
                problems += self._refusals_despite(values, failed, keywords)
        except SourceError as exc:  # an unreadable or malformed .env or TOML file
            problems.append(f"{exc.variable}: {exc.reason}")
        if problems:
            raise ConfigurationError(problems)

    def _refusals_despite(self, values: dict[str, Any], failed: set[str], keywords: frozenset[str]) -> list[str]:
        """The cross-field refusals of ``values`` with each ``failed`` field at its default."""
        fields = type(self).model_fields
        retry = {**values, **{name: fields[name].get_default(call_default_factory=True) for name in failed}}
        try:
            super().__init__(**retry)
        except ValidationError as exc:
            return [line for field, line, refusal in _described(exc, keywords) if refusal and field not in failed]
        except SourceError:
            return []
        return []

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
        env_file = env_file_path()
        if env_file is not None:
            if os.environ.get(ENV_FILE_VARIABLE) and not env_file.is_file():
                raise SourceError(ENV_FILE_VARIABLE, f"{str(env_file)!r} is not a readable file")
            try:
                sources.append(DotEnvSettingsSource(settings_cls, env_file=env_file, env_prefix=ENV_PREFIX))
            except (OSError, ValueError) as exc:
                raise SourceError(ENV_FILE_VARIABLE, f"{str(env_file)!r}: {exc}") from None
        config_file = os.environ.get(CONFIG_FILE_VARIABLE)
        if config_file:
            try:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
            except (OSError, ValueError) as exc:
                raise SourceError(CONFIG_FILE_VARIABLE, str(exc)) from None
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
        value = split_commas(value)
        if isinstance(value, (list, tuple)):
            return parse_origins([str(item) for item in value], patterns=True)
        return value

    @field_validator("public_origin", mode="before")
    @classmethod
    def _parse_public_origin(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_origin(value) if value.strip() else None
        return value

    @field_validator("cors_extra_headers", "cors_expose_headers", mode="before")
    @classmethod
    def _parse_header_names(cls, value: Any) -> Any:
        value = split_commas(value)
        if isinstance(value, (list, tuple)):
            for name in value:
                if not _HEADER_NAME.fullmatch(str(name)):
                    raise ValueError(f"{name!r} is not a valid header name")
        return value

    @field_validator("correlation_header", mode="before")
    @classmethod
    def _parse_correlation_header(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
            if not _HEADER_NAME.fullmatch(value):
                raise ValueError(f"{value!r} is not a valid header name")
        return value

    @field_validator("cors_allow_methods", mode="before")
    @classmethod
    def _parse_methods(cls, value: Any) -> Any:
        value = split_commas(value)
        if isinstance(value, (list, tuple)):
            return _without_option_name(allowed_methods, [str(method) for method in value])
        return value

    @field_validator("cors_expose_headers")
    @classmethod
    def _check_exposed(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        _without_option_name(exposed_headers, value)
        return value

    @field_validator("x_frame_options", mode="before")
    @classmethod
    def _parse_frame_options(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("no_store_paths", "rate_limit_auth_paths", "rate_limit_exempt_paths", mode="before")
    @classmethod
    def _parse_paths(cls, value: Any) -> Any:
        value = split_commas(value)
        if isinstance(value, (list, tuple)):
            for path in value:
                if not str(path).startswith("/"):
                    raise ValueError(f"{path!r} must start with '/'")
        return value

    @field_validator("csrf_exempt_paths", mode="before")
    @classmethod
    def _parse_exact_paths(cls, value: Any) -> Any:
        value = cls._parse_paths(value)
        if isinstance(value, (list, tuple)):
            for path in value:
                if any(char in str(path) for char in "*?#"):
                    raise ValueError(f"{path!r}: exact paths only (no wildcard, query or fragment)")
        return value

    @field_validator("route_max_body_bytes", mode="before")
    @classmethod
    def _parse_route_limits(cls, value: Any) -> Any:
        if isinstance(value, str):
            limits: dict[str, int] = {}
            for item in split_commas(value):
                path, _, size = item.partition("=")
                path, size = path.strip(), size.strip()
                if not path.startswith("/") or not size.isdigit():
                    raise ValueError(f"{item!r} is not '/path=bytes' (or '/prefix*=bytes')")
                limits[path] = int(size)
            return limits
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

        value = split_commas(value)
        if isinstance(value, (list, tuple)):
            parse_networks([str(item) for item in value])
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not value.strip().startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("use redis://host:port/db or rediss://…")
        if importlib.util.find_spec("coredis") is None:
            raise ValueError('Redis needs the redis extra: pip install "thallus[redis]"')
        return value.strip()

    @field_validator("proxy_header", mode="before")
    @classmethod
    def _parse_proxy_header(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

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

    @field_validator("cross_origin_embedder_policy")
    @classmethod
    def _check_embedder_policy(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        return headers.validate_isolation_value("cross_origin_embedder_policy", value.strip())

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
        if refusals := self.refusals():
            raise _RefusalsError(refusals)
        return self

    def refusals(self) -> list[Refusal]:
        """Every cross-field refusal of this configuration (the service's extend these)."""
        refusals: list[Refusal] = []
        if self.hsts_preload and (not self.hsts_include_subdomains or self.hsts_max_age < 31536000):
            refusals.append(
                ("hsts_preload", "preload needs THALLUS_HSTS_INCLUDE_SUBDOMAINS=true and a max-age of a year or more")
            )
        if self.env == "production":
            if self.public_origin is not None and not self.public_origin.startswith("https://"):
                refusals.append(("public_origin", f"{self.public_origin!r} is not https; production serves https only"))
            for origin in self.origins:
                if not origin.startswith("https://"):
                    refusals.append(
                        ("allowed_origins", f"{origin!r} is not https; production allows https origins only")
                    )
                    break
        return refusals

    # -- loading ----------------------------------------------------------------------------

    @classmethod
    def load(cls, **overrides: Any) -> Self:
        """Read settings from the environment, ``.env`` and config file; raise :class:`ConfigurationError`."""
        return cls(**overrides)

    # -- derived policy ---------------------------------------------------------------------

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
        """Whether a 500 names the exception (development only, docs/design.md §6)."""
        return self.env == "development"

    @property
    def hsts_enabled(self) -> bool:
        return self.env == "production" and self.hsts_max_age > 0


def _without_option_name(check: Any, values: Any) -> Any:
    """``check(values)``, its ValueError without the CORS layer's own option name (the problem's
    line names the keyword or the variable instead)."""
    try:
        return check(values)
    except ValueError as exc:
        raise ValueError(str(exc).split(": ", 1)[-1]) from None


def env_file_path() -> Path | None:
    """The ``.env`` file read: ``THALLUS_ENV_FILE`` (empty: none), else ``.env`` in the working directory."""
    chosen = os.environ.get(ENV_FILE_VARIABLE)
    if chosen is None:
        return Path(DEFAULT_ENV_FILE)
    return Path(chosen) if chosen.strip() else None


def variable_name(field: str) -> str:
    """``allowed_origins`` → ``THALLUS_ALLOWED_ORIGINS``."""
    return ENV_PREFIX + field.upper()


def source_name(field: str, keywords: frozenset[str] = frozenset()) -> str:
    """What a problem with ``field`` names: the keyword if it was one, else the variable."""
    return field if field in keywords else variable_name(field)


def unknown_keywords(settings_cls: type[Settings], keywords: frozenset[str]) -> list[str]:
    """One line per keyword that is no field of ``settings_cls``, with the nearest field if any."""
    fields = list(settings_cls.model_fields)
    lines = []
    for name in sorted(keywords - set(fields)):
        near = difflib.get_close_matches(name, fields, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        lines.append(f"{name}: unknown setting of {settings_cls.__name__}{hint}")
    return lines


def _described(exc: ValidationError, keywords: frozenset[str]) -> list[tuple[str | None, str, bool]]:
    """``(field, line, is_refusal)`` per problem; the line is ``NAME: reason``."""
    described: list[tuple[str | None, str, bool]] = []
    for error in exc.errors():
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, _RefusalsError):
            described += [
                (field, f"{source_name(field, keywords)}: {reason}", True) for field, reason in cause.refusals
            ]
            continue
        field = next((str(part) for part in error["loc"] if isinstance(part, str)), None)
        reason = str(cause) if isinstance(cause, (InvalidOriginError, ValueError)) else error["msg"]
        described.append((field, f"{source_name(field, keywords)}: {reason}" if field else reason, False))
    return described


def describe_errors(exc: ValidationError, keywords: frozenset[str] = frozenset()) -> list[str]:
    """One line per problem: ``THALLUS_VARIABLE: reason`` (or ``keyword: reason``)."""
    return [line for _, line, _ in _described(exc, keywords)]
