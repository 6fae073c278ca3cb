"""``thallus users`` / ``thallus keys`` / ``thallus db``, and the README's walk-through, as real processes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.server import THALLUS, running_server

PASSWORD = "Correct-Horse-Battery-9!"


def thallus(data_dir: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("THALLUS_")}
    env["THALLUS_DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [THALLUS, *args], env=env, input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


def test_users_create_and_list(tmp_path: Path) -> None:
    created = thallus(
        tmp_path,
        "users",
        "create",
        "--email",
        "Ada@Example.com",
        "--password",
        PASSWORD,
        "--name",
        "Ada Lovelace",
        "--api-access",
    )
    assert created.returncode == 0, created.stderr
    user_id = created.stdout.split()[0]
    admin = thallus(
        tmp_path, "users", "create", "--email", "root@example.com", "--password", "-", "--admin", stdin=PASSWORD + "\n"
    )
    assert admin.returncode == 0, admin.stderr
    listed = thallus(tmp_path, "users", "list")
    assert listed.returncode == 0
    lines = listed.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].split()[:4] == [user_id, "ada@example.com", "user", "api_access"]
    assert lines[0].endswith("Ada Lovelace")
    assert lines[1].split()[1:4] == ["root@example.com", "admin", "-"]
    assert PASSWORD not in listed.stdout


def test_users_create_refusals(tmp_path: Path) -> None:
    assert thallus(tmp_path, "users", "create", "--email", "a@example.com", "--password", PASSWORD).returncode == 0
    duplicate = thallus(tmp_path, "users", "create", "--email", "A@example.com", "--password", PASSWORD)
    assert duplicate.returncode == 1
    assert duplicate.stderr.strip() == "thallus: A user with this e-mail address already exists."
    weak = thallus(tmp_path, "users", "create", "--email", "b@example.com", "--password", "weakpassword")
    assert weak.returncode == 1
    assert weak.stderr.splitlines()[0] == (
        "thallus: The password must be 12–128 characters with an upper-case letter, a lower-case letter, "
        "a digit and a special character."
    )
    assert "needs a digit" in weak.stderr
    invalid = thallus(tmp_path, "users", "create", "--email", "not-an-address", "--password", PASSWORD)
    assert invalid.returncode == 1
    assert "email" in invalid.stderr


def test_keys_create(tmp_path: Path) -> None:
    thallus(tmp_path, "users", "create", "--email", "ada@example.com", "--password", PASSWORD)
    created = thallus(tmp_path, "keys", "create", "--email", "ada@example.com", "--name", "deploy bot")
    assert created.returncode == 0, created.stderr
    raw = created.stdout.strip()
    assert raw.startswith("thal_") and len(raw) == 48, "stdout is the key alone, for KEY=$(…)"
    assert raw not in created.stderr and "thal_" in created.stderr, "stderr names the masked preview"
    unknown = thallus(tmp_path, "keys", "create", "--email", "nobody@example.com", "--name", "x")
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == "thallus: No user with e-mail address nobody@example.com."
    bad_time = thallus(tmp_path, "keys", "create", "--email", "ada@example.com", "--name", "x", "--expires-at", "soon")
    assert bad_time.returncode == 2
    assert "argument --expires-at: 'soon' is not an ISO 8601 date or time" in bad_time.stderr


def test_db_upgrade(tmp_path: Path) -> None:
    result = thallus(tmp_path, "db", "upgrade")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "thallus.db").exists()


def test_unreachable_database(tmp_path: Path) -> None:
    env_url = "postgresql+asyncpg://postgres@127.0.0.1:1/nowhere"
    env = {k: v for k, v in os.environ.items() if not k.startswith("THALLUS_")}
    env.update(THALLUS_DATABASE_URL=env_url, THALLUS_DATA_DIR=str(tmp_path))
    for args in (["users", "list"], ["serve", "--port", "1"]):
        result = subprocess.run([THALLUS, *args], env=env, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 1
        assert result.stderr.startswith("thallus: the database is unavailable: cannot migrate postgresql+asyncpg://")
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_readme_walkthrough(tmp_path: Path, workers: int) -> None:
    """Start on the embedded defaults, create a user with the CLI, log in, create a key, use it."""
    with running_server({"THALLUS_DATA_DIR": str(tmp_path)}, "--workers", str(workers)) as server:
        created = thallus(
            tmp_path, "users", "create", "--email", "ada@example.com", "--password", PASSWORD, "--api-access"
        )
        assert created.returncode == 0, created.stderr
        login = httpx.post(server.url + "/api/v1/auth/login", json={"email": "ada@example.com", "password": PASSWORD})
        assert login.status_code == 200, login.text
        token = login.json()["access_token"]
        key = httpx.post(
            server.url + "/api/v1/api-keys", json={"name": "laptop"}, headers={"Authorization": f"Bearer {token}"}
        )
        assert key.status_code == 201, key.text
        for _ in range(4):  # every worker answers
            me = httpx.get(server.url + "/api/v1/users/me", headers={"X-API-Key": key.json()["key"]})
            assert me.status_code == 200
            assert me.json()["email"] == "ada@example.com"


def test_users_set_changes_role_features_and_active(tmp_path: Path) -> None:
    created = thallus(tmp_path, "users", "create", "--email", "ada@example.com", "--password", PASSWORD)
    user_id = created.stdout.split()[0]
    changed = thallus(tmp_path, "users", "set", "--email", "ADA@example.com", "--role", "admin", "--api-access")
    assert changed.returncode == 0, changed.stderr
    assert changed.stdout.split() == [user_id, "ada@example.com", "admin", "api_access", "active"]
    off = thallus(tmp_path, "users", "set", "--email", "ada@example.com", "--no-api-access", "--no-active")
    assert off.stdout.split()[3:] == ["-", "inactive"]
    assert thallus(tmp_path, "users", "set", "--email", "ada@example.com").returncode == 2, "nothing to change"
    missing = thallus(tmp_path, "users", "set", "--email", "nobody@example.com", "--role", "user")
    assert missing.returncode == 1 and "No user" in missing.stderr
