"""ServiceSettings: profiles per environment, parsing of THALLUS_* variables, start-up refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from thallus.server.settings import ServiceSettings
from thallus.settings import DEVELOPMENT_ORIGINS, ConfigurationError

SECRET = "s" * 40
PRODUCTION = {
    "THALLUS_ENV": "production",
    "THALLUS_SECRET_KEY": SECRET,
    "THALLUS_ALLOWED_ORIGINS": "https://app.example.com",
    "THALLUS_PUBLIC_ORIGIN": "https://api.example.com",
}


def load(monkeypatch: pytest.MonkeyPatch, **variables: str) -> ServiceSettings:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    return ServiceSettings.load()


def problems(monkeypatch: pytest.MonkeyPatch, **variables: str) -> list[str]:
    with pytest.raises(ConfigurationError) as caught:
        load(monkeypatch, **variables)
    return caught.value.problems


def test_development_defaults_need_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load(monkeypatch)
    assert settings.env == "development"
    assert settings.origins == DEVELOPMENT_ORIGINS
    assert not settings.csrf_requires_origin_evidence
    assert settings.expose_error_details
    assert not settings.hsts_enabled
    cookie = settings.cookie_policy
    assert (cookie.secure, cookie.same_site, cookie.path, cookie.http_only) == (False, "Lax", "/api/v1/auth", True)


def test_production_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load(monkeypatch, **PRODUCTION)
    assert settings.origins == ("https://app.example.com",)
    assert settings.trusted_origins == ("https://api.example.com", "https://app.example.com")
    assert settings.csrf_requires_origin_evidence
    assert not settings.expose_error_details
    assert settings.hsts_enabled
    cookie = settings.cookie_policy
    assert (cookie.secure, cookie.same_site, cookie.path) == (True, "Strict", "/api/v1/auth")


def test_test_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load(
        monkeypatch, THALLUS_ENV="test", THALLUS_SECRET_KEY=SECRET, THALLUS_ALLOWED_ORIGINS="http://test.example"
    )
    assert settings.csrf_requires_origin_evidence
    assert not settings.hsts_enabled
    assert (settings.cookie_policy.secure, settings.cookie_policy.same_site) == (True, "Strict")


def test_origins_list_is_comma_separated_trimmed_and_deduplicated(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load(
        monkeypatch, THALLUS_ALLOWED_ORIGINS=" https://a.example , HTTPS://A.example,, http://b.example:8080 "
    )
    assert settings.origins == ("https://a.example", "http://b.example:8080")


def test_explicit_empty_allowlist_in_development(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load(monkeypatch, THALLUS_ALLOWED_ORIGINS="").origins == ()


def test_environment_name_is_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load(monkeypatch, **{**PRODUCTION, "THALLUS_ENV": "Production"}).env == "production"


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({"THALLUS_ENV": "staging"}, "THALLUS_ENV: Input should be 'development', 'test' or 'production'"),
        ({"THALLUS_ALLOWED_ORIGINS": "*"}, "THALLUS_ALLOWED_ORIGINS: '*' is a wildcard"),
        (
            {"THALLUS_ALLOWED_ORIGINS": "https://a.example, https://*.example"},
            "THALLUS_ALLOWED_ORIGINS: 'https://*.example' is a wildcard",
        ),
        (
            {"THALLUS_ALLOWED_ORIGINS": "https://app.example.com/"},
            "THALLUS_ALLOWED_ORIGINS: 'https://app.example.com/' has a path",
        ),
        (
            {"THALLUS_ALLOWED_ORIGINS": "https://app.example.com?a"},
            "THALLUS_ALLOWED_ORIGINS: 'https://app.example.com?a' has a query",
        ),
        (
            {"THALLUS_ALLOWED_ORIGINS": "https://u@app.example.com"},
            "THALLUS_ALLOWED_ORIGINS: 'https://u@app.example.com' has userinfo",
        ),
        ({"THALLUS_ALLOWED_ORIGINS": "app.example.com"}, "THALLUS_ALLOWED_ORIGINS: 'app.example.com' has no scheme"),
        ({"THALLUS_ALLOWED_ORIGINS": "null"}, "THALLUS_ALLOWED_ORIGINS: 'null'"),
        (
            {"THALLUS_PUBLIC_ORIGIN": "https://api.example.com/v1"},
            "THALLUS_PUBLIC_ORIGIN: 'https://api.example.com/v1' has a path",
        ),
        ({"THALLUS_CORS_MAX_AGE": "-1"}, "THALLUS_CORS_MAX_AGE:"),
        (
            {"THALLUS_CORS_EXTRA_HEADERS": "X-Ok, bad header"},
            "THALLUS_CORS_EXTRA_HEADERS: 'bad header' is not a valid header name",
        ),
        ({"THALLUS_XSS_PROTECTION": "2"}, "THALLUS_XSS_PROTECTION:"),
        ({"THALLUS_REFERRER_POLICY": "sometimes"}, "THALLUS_REFERRER_POLICY: 'sometimes' is not a referrer policy"),
        ({"THALLUS_CSP_EXTRA_SOURCES": "img-src self"}, "THALLUS_CSP_EXTRA_SOURCES: CSP keyword 'self' must be quoted"),
        (
            {"THALLUS_CSP_EXTRA_SOURCES": "script-src 'nonce-abc'"},
            "THALLUS_CSP_EXTRA_SOURCES: nonces are minted per response",
        ),
        (
            {"THALLUS_CSP_EXTRA_SOURCES": "scripts-src https://cdn.example"},
            "THALLUS_CSP_EXTRA_SOURCES: 'scripts-src' is not a CSP",
        ),
        (
            {"THALLUS_CSP_EXTRA_SOURCES": "img-src https://a;b"},
            "THALLUS_CSP_EXTRA_SOURCES: 'b' is not a CSP source-list directive",
        ),
        ({"THALLUS_CSP_REPORT_URI": "javascript:alert(1)"}, "THALLUS_CSP_REPORT_URI:"),
        (
            {"THALLUS_PERMISSIONS_POLICY": "camera=none"},
            "THALLUS_PERMISSIONS_POLICY: 'camera=none' is not feature=(allowlist)",
        ),
        (
            {"THALLUS_CROSS_ORIGIN_OPENER_POLICY": "strict"},
            "THALLUS_CROSS_ORIGIN_OPENER_POLICY: 'strict' is not one of",
        ),
        ({"THALLUS_HSTS_PRELOAD": "true"}, "THALLUS_HSTS_PRELOAD: preload needs THALLUS_HSTS_INCLUDE_SUBDOMAINS=true"),
        ({"THALLUS_LOG_LEVEL": "loud"}, "THALLUS_LOG_LEVEL: must be one of"),
        ({"THALLUS_NO_STORE_PATHS": "api"}, "THALLUS_NO_STORE_PATHS: 'api' must start with '/'"),
    ],
)
def test_refusals_name_the_variable_and_the_reason(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], expected: str
) -> None:
    lines = problems(monkeypatch, **variables)
    assert len(lines) == 1
    assert lines[0].startswith(expected), lines[0]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"THALLUS_SECRET_KEY": ""}, "THALLUS_SECRET_KEY: is required in production"),
        ({"THALLUS_SECRET_KEY": "short"}, "THALLUS_SECRET_KEY: must be at least 32 characters in production"),
        ({"THALLUS_PUBLIC_ORIGIN": ""}, "THALLUS_PUBLIC_ORIGIN: is required in production"),
        (
            {"THALLUS_PUBLIC_ORIGIN": "http://api.example.com"},
            "THALLUS_PUBLIC_ORIGIN: 'http://api.example.com' is not https",
        ),
        (
            {"THALLUS_ALLOWED_ORIGINS": "https://a.example, http://app.example.com"},
            "THALLUS_ALLOWED_ORIGINS: 'http://app.example.com' is not https",
        ),
        ({"THALLUS_ALLOWED_ORIGINS": ""}, "THALLUS_ALLOWED_ORIGINS: must list the allowed origins in production"),
        ({"THALLUS_DEBUG": "true"}, "THALLUS_DEBUG: debug mode is refused in production"),
    ],
)
def test_production_refuses_unsafe_settings(
    monkeypatch: pytest.MonkeyPatch, change: dict[str, str], expected: str
) -> None:
    lines = problems(monkeypatch, **{**PRODUCTION, **change})
    assert len(lines) == 1
    assert lines[0].startswith(expected), lines[0]


def test_production_refuses_a_missing_secret_even_when_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    variables = {k: v for k, v in PRODUCTION.items() if k != "THALLUS_SECRET_KEY"}
    assert problems(monkeypatch, **variables) == ["THALLUS_SECRET_KEY: is required in production"]


def test_test_environment_refuses_missing_secret_and_origins(monkeypatch: pytest.MonkeyPatch) -> None:
    assert problems(monkeypatch, THALLUS_ENV="test") == [
        "THALLUS_SECRET_KEY: is required in test",
        "THALLUS_ALLOWED_ORIGINS: must list the allowed origins in test",
    ]
    assert problems(monkeypatch, THALLUS_ENV="test", THALLUS_SECRET_KEY=SECRET) == [
        "THALLUS_ALLOWED_ORIGINS: must list the allowed origins in test"
    ]


def test_test_environment_accepts_http_origins(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load(
        monkeypatch, THALLUS_ENV="test", THALLUS_SECRET_KEY=SECRET, THALLUS_ALLOWED_ORIGINS="http://t.example"
    )
    assert settings.origins == ("http://t.example",)


def test_development_accepts_short_or_missing_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load(monkeypatch, THALLUS_SECRET_KEY="short").secret_key is not None


def test_secret_is_not_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load(monkeypatch, **PRODUCTION)
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings.model_dump())


def test_toml_file_supplies_values_that_variables_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "thallus.toml"
    config.write_text(
        'env = "production"\nsecret_key = "' + SECRET + '"\npublic_origin = "https://api.example.com"\n'
        'allowed_origins = ["https://app.example.com", "https://admin.example.com"]\ncors_max_age = 60\n'
    )
    settings = load(monkeypatch, THALLUS_CONFIG_FILE=str(config), THALLUS_CORS_MAX_AGE="120")
    assert settings.env == "production"
    assert settings.origins == ("https://app.example.com", "https://admin.example.com")
    assert settings.cors_max_age == 120


def test_toml_file_values_are_validated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "thallus.toml"
    config.write_text('allowed_origins = ["*"]\n')
    assert problems(monkeypatch, THALLUS_CONFIG_FILE=str(config)) == [
        "THALLUS_ALLOWED_ORIGINS: '*' is a wildcard; list every origin explicitly"
    ]


def test_malformed_toml_file_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "thallus.toml"
    config.write_text("env = \n")
    lines = problems(monkeypatch, THALLUS_CONFIG_FILE=str(config))
    assert lines[0].startswith("THALLUS_CONFIG_FILE:")


def test_settings_are_immutable(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load(monkeypatch)
    with pytest.raises(ValueError, match="frozen"):
        settings.env = "production"  # type: ignore[misc]
