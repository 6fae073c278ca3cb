"""``/ready`` on a real ``thallus serve``: 200 while PostgreSQL and Redis answer, a 503 in the §8
shape naming what failed while one is cut (a TCP proxy between the service and the real server),
200 again once it is back; ``/health`` stays 200 throughout (liveness needs neither)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from sqlalchemy.engine import URL

from tests.redis_support import delete_prefix, new_prefix, require_redis
from tests.server import Server, running_server
from tests.tcp_proxy import TcpProxy, tcp_proxy

SETTINGS = {
    "THALLUS_ENV": "production",
    "THALLUS_SECRET_KEY": "ready-served-secret-" + "s" * 28,
    "THALLUS_ALLOWED_ORIGINS": "https://app.example.com",
    "THALLUS_PUBLIC_ORIGIN": "https://api.example.com",
    "THALLUS_LOG_LEVEL": "INFO",
}


def through(url: str, proxy: TcpProxy) -> str:
    """``url`` with its host and port replaced by the proxy's."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = netloc[0] + "@" if len(netloc) == 2 else ""
    return urlunsplit(parts._replace(netloc=f"{userinfo}127.0.0.1:{proxy.port}"))


@pytest.fixture
def served(empty_postgres: URL) -> Iterator[tuple[Server, TcpProxy, TcpProxy]]:
    redis = require_redis()
    prefix = new_prefix()
    redis_parts = urlsplit(redis)
    assert empty_postgres.host is not None and redis_parts.hostname is not None
    with (
        tcp_proxy(empty_postgres.host, empty_postgres.port or 5432) as postgres_proxy,
        tcp_proxy(redis_parts.hostname, redis_parts.port or 6379) as redis_proxy,
    ):
        database = empty_postgres.set(host="127.0.0.1", port=postgres_proxy.port)
        environment = {
            **SETTINGS,
            "THALLUS_DATABASE_URL": database.render_as_string(hide_password=False),
            "THALLUS_REDIS_URL": through(redis, redis_proxy),
            "THALLUS_REDIS_KEY_PREFIX": prefix,
        }
        try:
            with running_server(environment) as server:
                yield server, postgres_proxy, redis_proxy
        finally:
            redis_proxy.restore()
            delete_prefix(redis, prefix)


def ready(server: Server) -> httpx.Response:
    return httpx.get(server.url + "/ready", timeout=10)


def until(server: Server, status: int) -> httpx.Response:
    """``/ready`` until it answers ``status`` (a cut connection may take a probe to notice)."""
    deadline = time.monotonic() + 10
    while (response := ready(server)).status_code != status:
        assert time.monotonic() < deadline, f"/ready still {response.status_code}: {response.text}"
        time.sleep(0.1)
    return response


def assert_not_ready(response: httpx.Response, failed: str, answering: str) -> None:
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["error"] == "ServiceUnavailableError"
    assert failed in body["message"], body
    assert body["details"]["checks"][answering] == "ok"
    assert body["details"]["checks"][failed] != "ok"
    assert body["correlation_id"] == response.headers["x-correlation-id"]
    assert response.headers["retry-after"] == "5"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-content-type-options"] == "nosniff"


def test_ready_follows_postgres_and_redis(served: tuple[Server, TcpProxy, TcpProxy]) -> None:
    server, postgres, redis = served
    answer = ready(server)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"status": "ready", "checks": {"database": "ok", "redis": "ok"}}

    postgres.cut()
    started = time.monotonic()
    assert_not_ready(until(server, 503), "database", "redis")
    assert time.monotonic() - started < 5, "a probe answers within its deadline, never waits on the database"
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    postgres.restore()
    assert until(server, 200).json()["checks"] == {"database": "ok", "redis": "ok"}

    redis.cut()
    assert_not_ready(until(server, 503), "redis", "database")
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    redis.restore()
    until(server, 200)

    # once per change of state, not once per probe
    for _ in range(5):
        ready(server)
    log = "".join(server.lines)
    assert log.count("not ready: database") == 1, log[-3000:]
    assert log.count("not ready: redis") == 1, log[-3000:]


def test_ready_without_redis_checks_the_database_only() -> None:
    with running_server(SETTINGS) as server:
        answer = ready(server)
        assert answer.status_code == 200, answer.text
        assert answer.json()["checks"] == {"database": "ok"}
        head = httpx.head(server.url + "/ready", timeout=10)
        assert head.status_code == 200
