"""The reference service in-process, on a real database, through Starlette's TestClient."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from starlette.testclient import TestClient

from thallus.audit import AuditEvent
from thallus.server.api import Service, create_app
from thallus.server.audit.chain import FIELDS
from thallus.server.audit.store import AuditFilter
from thallus.server.identity.service import Identity
from thallus.server.settings import ServiceSettings
from thallus.server.storage.models import AuditLog, User

SECRET = "t" * 48
SPA = "https://app.example.com"
PUBLIC = "https://api.example.com"
PASSWORD = "Correct-Horse-Battery-9!"
SAME_ORIGIN = {"Sec-Fetch-Site": "same-origin", "Origin": PUBLIC}


#: Every secret a test handed to the service: no audit record of the whole suite may contain one.
SECRETS_USED: set[str] = {PASSWORD}


def remember_secret(value: str) -> str:
    if len(value) >= 8:
        SECRETS_USED.add(value)
    return value


class RecordingSink:
    """An audit sink that keeps the events (the persistent store is another issue's work)."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def record(self, event: AuditEvent) -> None:
        self.events.append(event)

    def actions(self) -> list[str]:
        return [event.action for event in self.events]


def settings_for(database_url: str, **overrides: Any) -> ServiceSettings:
    values: dict[str, Any] = {
        "env": "test",
        "secret_key": SECRET,
        "allowed_origins": SPA,
        "public_origin": PUBLIC,
        "database_url": database_url,
        "argon2_time_cost": 1,
        "argon2_memory_cost": 19456,
        "argon2_parallelism": 1,
    }
    values.update(overrides)
    return ServiceSettings(**values)


class Api:
    """A running service and a client for it."""

    def __init__(self, service: Service, client: TestClient, audit: RecordingSink) -> None:
        self.service = service
        self.client = client
        self.audit = audit

    @property
    def identity(self) -> Identity:
        return self.service.identity

    @property
    def cookie_name(self) -> str:
        """The refresh cookie's name (``__Secure-thallus_refresh`` outside development)."""
        return self.identity.settings.cookie_policy.name

    def run(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        """Call an async identity function on the service's own event loop."""
        assert self.client.portal is not None
        return self.client.portal.call(lambda: function(*args, **kwargs))

    def create_user(self, email: str = "ada@example.com", *, api_access: bool = True, role: str = "user") -> User:
        user: User = self.run(self.identity.create_user, email, PASSWORD, "Ada", role=role, api_access=api_access)
        return user

    def login(self, email: str = "ada@example.com", password: str = PASSWORD, **headers: str) -> Any:
        remember_secret(password)
        response = self.client.post(
            "/api/v1/auth/login", json={"email": email, "password": password}, headers={**SAME_ORIGIN, **headers}
        )
        if response.status_code == 200:
            remember_secret(response.json()["access_token"])
            remember_secret(self.client.cookies.get(self.cookie_name) or "")
        return response

    def bearer(self, email: str = "ada@example.com") -> dict[str, str]:
        response = self.login(email)
        assert response.status_code == 200, response.text
        return {"Authorization": f"Bearer {response.json()['access_token']}"}

    def new_key(self, headers: dict[str, str], **body: Any) -> dict[str, Any]:
        response = self.client.post("/api/v1/api-keys", json={"name": "ci", **body}, headers=headers)
        assert response.status_code == 201, response.text
        document: dict[str, Any] = response.json()
        remember_secret(document["key"])
        return document

    def flush_audit(self) -> None:
        """Wait until the audit writer has stored everything recorded so far (it writes asynchronously)."""
        writer = self.service.audit
        assert writer is not None
        self.run(writer.flush)

    def stored_audit(self) -> list[AuditLog]:
        """Every record in the persistent audit log, oldest first (after flushing the writer)."""
        writer = self.service.audit
        assert writer is not None

        async def read() -> list[AuditLog]:
            await writer.flush()
            return [row async for row in writer.store.stream(AuditFilter())]

        rows: list[AuditLog] = self.run(read)
        return rows


@contextmanager
def running_api(settings: ServiceSettings, base_url: str = PUBLIC) -> Iterator[Api]:
    """The service on a TestClient; on exit, every persisted audit record is scanned for secrets."""
    audit = RecordingSink()
    service = create_app(settings, audit=audit)
    with TestClient(service, base_url=base_url) as client:
        api = Api(service, client, audit)
        yield api
        if service.audit is not None:
            assert_no_secrets(api.stored_audit())


def assert_no_secrets(rows: list[AuditLog]) -> None:
    for row in rows:
        text = json.dumps({name: getattr(row, name) for name in FIELDS}, default=str)
        leaked = [secret for secret in SECRETS_USED if secret in text]
        assert not leaked, f"audit record {row.seq} ({row.action}) contains a secret"
