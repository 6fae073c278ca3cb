"""The layers' settings (``thallus.Settings``): only what the layers use, unknown keywords refused,
``.env`` files read, every problem at once, each named by where it came from."""

from __future__ import annotations

from pathlib import Path

import pytest

from thallus import ConfigurationError, Settings

SECRET = "s" * 40


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No THALLUS_* variable of the caller's, and a working directory without a .env."""
    import os

    for name in list(os.environ):
        if name.startswith("THALLUS_") and not name.startswith("THALLUS_TEST_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def problems(**values: object) -> list[str]:
    with pytest.raises(ConfigurationError) as caught:
        Settings(**values)
    return caught.value.problems


def test_production_layers_need_no_secret_and_no_allowlist() -> None:
    settings = Settings(env="production")
    assert settings.origins == ()
    assert settings.hsts_enabled
    assert settings.csrf_requires_origin_evidence
    assert "secret_key" not in Settings.model_fields
    assert "database_url" not in Settings.model_fields


def test_an_unknown_keyword_is_refused_with_the_nearest_field() -> None:
    assert problems(allowed_origin="https://app.example.com") == [
        "allowed_origin: unknown setting of Settings (did you mean 'allowed_origins'?)"
    ]
    assert problems(secret_key=SECRET) == ["secret_key: unknown setting of Settings"]


def test_unknown_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THALLUS_DATABASE_URL", "sqlite+aiosqlite:///x.db")  # the service's
    monkeypatch.setenv("THALLUS_ALLOWED_ORIGIN", "https://typo.example")
    assert Settings().env == "development"


def test_every_problem_at_once_named_by_its_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THALLUS_CORS_MAX_AGE", "-5")
    monkeypatch.setenv("THALLUS_HSTS_PRELOAD", "true")
    lines = problems(
        env="production", allowed_origins=("http://app.example.com",), referrer_policy="sometimes", colour=1
    )
    assert lines[0] == "colour: unknown setting of Settings"
    assert any(line.startswith("referrer_policy: 'sometimes' is not a referrer policy") for line in lines), lines
    assert any(line.startswith("THALLUS_CORS_MAX_AGE: ") for line in lines), lines
    # the cross-field refusals of the fields that did validate, in the same run
    assert any(line.startswith("THALLUS_HSTS_PRELOAD: preload needs") for line in lines), lines
    assert any(line.startswith("allowed_origins: 'http://app.example.com' is not https") for line in lines), lines
    assert len(lines) == 5, lines


def test_a_refusal_of_a_keyword_names_the_keyword() -> None:
    assert problems(env="production", public_origin="http://api.example.com") == [
        "public_origin: 'http://api.example.com' is not https; production serves https only"
    ]


def test_a_dotenv_file_is_read_below_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("THALLUS_CORS_MAX_AGE=42\nTHALLUS_REFERRER_POLICY=no-referrer\nOTHER=1\n")
    monkeypatch.setenv("THALLUS_REFERRER_POLICY", "same-origin")
    settings = Settings()
    assert settings.cors_max_age == 42
    assert settings.referrer_policy == "same-origin", "a variable wins over the .env file"
    assert Settings(cors_max_age=7).cors_max_age == 7, "a keyword wins over both"


def test_thallus_env_file_chooses_another_file_or_none(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("THALLUS_CORS_MAX_AGE=42\n")
    other = tmp_path / "production.env"
    other.write_text("THALLUS_CORS_MAX_AGE=99\n")
    monkeypatch.setenv("THALLUS_ENV_FILE", str(other))
    assert Settings().cors_max_age == 99
    monkeypatch.setenv("THALLUS_ENV_FILE", "")
    assert Settings().cors_max_age == 600
    monkeypatch.setenv("THALLUS_ENV_FILE", str(tmp_path / "missing.env"))
    assert problems() == [f"THALLUS_ENV_FILE: '{tmp_path / 'missing.env'}' is not a readable file"]


def test_a_bad_value_in_the_dotenv_file_names_the_variable(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("THALLUS_ALLOWED_ORIGINS=*\n")
    assert problems() == ["THALLUS_ALLOWED_ORIGINS: '*' is a wildcard; list every origin explicitly"]


def test_a_malformed_toml_file_is_named_even_with_a_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("THALLUS_CORS_MAX_AGE=42\n")
    config = tmp_path / "thallus.toml"
    config.write_text("env = \n")
    monkeypatch.setenv("THALLUS_CONFIG_FILE", str(config))
    [line] = problems()
    assert line.startswith("THALLUS_CONFIG_FILE: ")
