"""An unreachable database is a JSON 503 with the correlation ID — never a crash — and the
service recovers by itself when the database returns. PostgreSQL is cut with a real TCP proxy."""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy.engine import URL
from starlette.testclient import TestClient

from tests.service import PASSWORD, SAME_ORIGIN, running_api, settings_for
from tests.tcp_proxy import tcp_proxy
from thallus.server.api import create_app
from thallus.server.storage import DatabaseUnavailableError


def assert_unavailable(response: Any) -> None:
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["error"] == "ServiceUnavailableError"
    assert body["correlation_id"] == response.headers["x-correlation-id"]
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-store"


def test_postgres_outage_and_recovery(empty_postgres: URL) -> None:
    postgres_database = empty_postgres
    assert postgres_database.host is not None
    with tcp_proxy(postgres_database.host, postgres_database.port or 5432) as proxy:
        url = postgres_database.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        with running_api(settings_for(url)) as api:
            api.create_user()
            bearer = api.bearer()
            key = api.new_key(bearer)["key"]

            proxy.cut()
            login = api.login()
            assert_unavailable(login)
            assert login.headers["retry-after"] == "5"
            # The identity view decides from memory while it is fresh; once its reads have failed
            # for longer than its bound, every request is checked in the database: a 503.
            deadline = time.monotonic() + api.identity.view.bound + 2
            while (me := api.client.get("/api/v1/users/me", headers=bearer)).status_code == 200:
                assert time.monotonic() < deadline, "a stale view must not keep accepting"
                time.sleep(0.05)
            assert_unavailable(me)
            assert_unavailable(api.client.get("/api/v1/users/me", headers={"X-API-Key": key}))
            assert_unavailable(api.client.post("/api/v1/auth/refresh", headers=SAME_ORIGIN))
            assert api.client.get("/health").status_code == 200, "liveness does not need the database"

            proxy.restore()
            assert api.login().status_code == 200
            assert api.client.get("/api/v1/users/me", headers={"X-API-Key": key}).status_code == 200
    # and the run's database is intact
    with running_api(settings_for(postgres_database.render_as_string(hide_password=False))) as again:
        assert again.login(password=PASSWORD).status_code == 200


def test_start_up_without_a_database_fails_loudly() -> None:
    service = create_app(settings_for("postgresql+asyncpg://postgres@127.0.0.1:1/nowhere"))
    with pytest.raises(DatabaseUnavailableError, match="cannot migrate"), TestClient(service):
        pass
