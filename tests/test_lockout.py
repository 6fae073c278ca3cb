"""Progressive login lockout (docs/design.md §10) through the API, in memory and on a real Redis."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RedisTarget
from tests.server import THALLUS
from tests.service import PASSWORD, SECRET, Api, running_api, settings_for

WRONG = "Wrong-Password-123!"


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "memory":
        return {}
    target: RedisTarget = request.getfixturevalue("redis_target")
    return {"redis_url": target.url, "redis_key_prefix": target.prefix}


def lockout_api(tmp_path: Path, backend: dict[str, Any], **overrides: Any) -> Any:
    settings = settings_for(
        f"sqlite+aiosqlite:///{tmp_path / 'lockout.db'}", rate_limit_auth="1000/minute", **backend, **overrides
    )
    return running_api(settings)


@pytest.fixture
def api(tmp_path: Path, backend: dict[str, Any]) -> Iterator[Api]:
    with lockout_api(tmp_path, backend) as running:
        running.create_user()
        yield running


def fail(api: Api, times: int, email: str = "ada@example.com") -> list[int]:
    return [api.login(email, WRONG).status_code for _ in range(times)]


def test_five_failures_lock_even_the_right_password(api: Api) -> None:
    assert fail(api, 5) == [401] * 5
    locked = api.login()
    assert locked.status_code == 429
    body = locked.json()
    assert body["error"] == "RateLimitError"
    assert body["correlation_id"] == locked.headers["x-correlation-id"]
    seconds = int(locked.headers["retry-after"])
    assert 890 <= seconds <= 900
    assert body["details"] == {"retry_after": seconds}
    locks = [e for e in api.audit.events if e.action == "account_locked"]
    assert len(locks) == 1
    assert locks[0].details is not None
    assert (locks[0].details["failed_attempts"], locks[0].details["locked_for"]) == (5, 900)
    assert all(WRONG not in str(e) and PASSWORD not in str(e) for e in api.audit.events), "never the password"


def test_lockout_does_not_reveal_whether_the_email_exists(api: Api) -> None:
    fail(api, 5, "ada@example.com")
    fail(api, 5, "ghost@example.com")
    known, unknown = api.login("ada@example.com"), api.login("ghost@example.com")
    assert known.status_code == unknown.status_code == 429
    assert known.json()["message"] == unknown.json()["message"]
    assert set(known.headers) == set(unknown.headers)


def test_attempts_during_a_lock_do_not_extend_it(api: Api) -> None:
    fail(api, 5)
    waits = [int(api.login(password=WRONG).headers["retry-after"]) for _ in range(3)]
    assert waits == sorted(waits, reverse=True)
    assert waits[0] <= 900


def test_success_resets_the_failure_count(api: Api) -> None:
    assert fail(api, 4) == [401] * 4
    assert api.login().status_code == 200
    assert fail(api, 4) == [401] * 4
    assert api.login().status_code == 200


def test_locks_grow_progressively(tmp_path: Path, backend: dict[str, Any]) -> None:
    with lockout_api(tmp_path, backend, lockout_threshold=2, lockout_steps="1,3") as api:
        api.create_user()
        fail(api, 2)
        assert int(api.login().headers["retry-after"]) == 1
        time.sleep(1.2)
        fail(api, 2)
        second = api.login()
        assert second.status_code == 429
        assert 2 <= int(second.headers["retry-after"]) <= 3, "the second lock takes the next step"


def test_admin_unlock_resets_lock_and_progression(tmp_path: Path, backend: dict[str, Any]) -> None:
    with lockout_api(tmp_path, backend, lockout_threshold=2, lockout_steps="60,120") as api:
        user = api.create_user()
        api.create_user("root@example.com", role="admin")
        admin = api.bearer("root@example.com")
        fail(api, 2)
        assert api.login().status_code == 429
        anonymous = api.client.post(f"/api/v1/admin/users/{user.id}/unlock")
        assert anonymous.status_code == 401
        unlocked = api.client.post(f"/api/v1/admin/users/{user.id}/unlock", headers=admin)
        assert unlocked.status_code == 204
        assert api.login().status_code == 200
        fail(api, 2)
        assert int(api.login().headers["retry-after"]) <= 60, "progression starts again at the first step"
        events = [e for e in api.audit.events if e.action == "account_unlocked"]
        assert events and events[0].details is not None and events[0].details["was_locked"] is True
        missing = api.client.post("/api/v1/admin/users/nobody/unlock", headers=admin)
        assert missing.status_code == 404


def test_unlock_needs_the_admin_role(api: Api) -> None:
    user_headers = api.bearer()
    response = api.client.post("/api/v1/admin/users/whoever/unlock", headers=user_headers)
    assert response.status_code == 403
    assert response.json()["error"] == "PermissionDeniedError"
    assert "permission_denied" in api.audit.actions()


def test_unreachable_redis_fails_lockout_closed_and_limits_open(tmp_path: Path) -> None:
    with lockout_api(tmp_path, {"redis_url": "redis://127.0.0.1:1/0"}) as api:
        api.create_user()
        login = api.login()
        assert login.status_code == 503
        assert login.json()["error"] == "ServiceUnavailableError"
        assert login.json()["correlation_id"] == login.headers["x-correlation-id"]
        assert api.client.get("/health").status_code == 200
        assert api.client.get("/api/v1/users/me").status_code == 401, "general limits fail open"


def test_cli_unlock(tmp_path: Path, redis_target: RedisTarget) -> None:
    database = tmp_path / "lockout.db"
    backend = {"redis_url": redis_target.url, "redis_key_prefix": redis_target.prefix}
    with lockout_api(tmp_path, backend, lockout_threshold=2) as api:
        api.create_user()
        fail(api, 2)
        assert api.login().status_code == 429
        env = {k: v for k, v in os.environ.items() if not k.startswith("THALLUS_")}
        env.update(
            THALLUS_DATABASE_URL=f"sqlite+aiosqlite:///{database}",
            THALLUS_REDIS_URL=redis_target.url,
            THALLUS_REDIS_KEY_PREFIX=redis_target.prefix,
            THALLUS_DATA_DIR=str(tmp_path),
            THALLUS_SECRET_KEY=SECRET,  # the server's: the lockout keys are keyed by it
        )
        result = subprocess.run(
            [THALLUS, "users", "unlock", "--email", "ada@example.com"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().endswith("ada@example.com unlocked")
        assert api.login().status_code == 200
    del env["THALLUS_REDIS_URL"]
    memory = subprocess.run(
        [THALLUS, "users", "unlock", "--email", "ada@example.com"], env=env, capture_output=True, text=True, check=False
    )
    assert memory.returncode == 1
    assert "THALLUS_REDIS_URL" in memory.stderr
