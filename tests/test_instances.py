"""Two ``thallus serve`` processes sharing one Redis and one PostgreSQL: limits and lockouts are global."""

from __future__ import annotations

from itertools import cycle

import httpx
from sqlalchemy.engine import URL

from tests.conftest import RedisTarget
from tests.server import running_server

PASSWORD = "Correct-Horse-Battery-9!"


def test_limits_and_lockout_hold_across_instances(empty_postgres: URL, redis_target: RedisTarget) -> None:
    environment = {
        "THALLUS_ENV": "test",
        "THALLUS_SECRET_KEY": "i" * 48,
        "THALLUS_ALLOWED_ORIGINS": "https://app.example.com",
        "THALLUS_PUBLIC_ORIGIN": "https://api.example.com",
        "THALLUS_DATABASE_URL": empty_postgres.render_as_string(hide_password=False),
        "THALLUS_REDIS_URL": redis_target.url,
        "THALLUS_REDIS_KEY_PREFIX": redis_target.prefix,
        "THALLUS_RATE_LIMIT": "6/minute",
        "THALLUS_RATE_LIMIT_AUTH": "4/minute",
        "THALLUS_LOCKOUT_THRESHOLD": "3",
        "THALLUS_TRUSTED_PROXIES": "127.0.0.1",  # lets each scenario below be its own client
        "THALLUS_ARGON2_TIME_COST": "1",
        "THALLUS_ARGON2_MEMORY_COST": "19456",
        "THALLUS_ARGON2_PARALLELISM": "1",
    }
    with running_server(environment) as first, running_server(environment) as second:
        urls = cycle([first.url, second.url])

        def post(path: str, client: str, **kwargs: object) -> httpx.Response:
            return httpx.post(next(urls) + path, headers={"X-Forwarded-For": client}, **kwargs)  # type: ignore[arg-type]

        created = post(
            "/api/v1/auth/register", "198.51.100.50", json={"email": "ada@example.com", "password": PASSWORD}
        )
        assert created.status_code == 201, created.text

        # the general limit: 6 requests in all, spread over both instances
        general = [
            httpx.get(next(urls) + "/api/v1/users/me", headers={"X-Forwarded-For": "198.51.100.1"}) for _ in range(7)
        ]
        assert [r.status_code for r in general] == [401] * 6 + [429]
        assert general[-1].headers["retry-after"] == "60"
        assert general[-1].json()["error"] == "RateLimitError"

        # the auth limit: 4 in all
        auth = [
            post("/api/v1/auth/login", "198.51.100.2", json={"email": f"nobody{i}@example.com", "password": "x"})
            for i in range(5)
        ]
        assert [r.status_code for r in auth] == [401] * 4 + [429]

        # the lockout: 3 failures in all, each from another address and instance, lock the account everywhere
        failures = [
            post(
                "/api/v1/auth/login",
                f"198.51.100.{10 + i}",
                json={"email": "ada@example.com", "password": "Wrong-123-pass!"},
            )
            for i in range(3)
        ]
        assert [r.status_code for r in failures] == [401, 401, 401]
        for instance in (first.url, second.url):
            locked = httpx.post(
                instance + "/api/v1/auth/login",
                headers={"X-Forwarded-For": "198.51.100.99"},
                json={"email": "ada@example.com", "password": PASSWORD},
            )
            assert locked.status_code == 429, locked.text
            assert 0 < int(locked.headers["retry-after"]) <= 900
