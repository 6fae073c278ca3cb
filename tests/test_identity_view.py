"""The identity view (docs/design.md §12): requests decided from memory, changes followed from the log.

In process, on SQLite and PostgreSQL: what a change drops, that a load racing a change is not
cached, that a stale view falls back to the database (and never accepts what the database would
refuse), and that the view recovers empty. The same rules against real ``thallus serve`` processes
are in tests/test_revocation_served.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.service import SAME_ORIGIN, Api, running_api, settings_for
from thallus.server.identity.api_keys import KeyRecord
from thallus.server.identity.view import BoundedCache, IdentityView, SessionView, UserView
from thallus.server.storage import Database
from thallus.server.storage.models import IdentityChange

LATER = datetime(2100, 1, 1, tzinfo=UTC)


def key(key_id: str, user_id: str) -> KeyRecord:
    return KeyRecord(key_id, user_id, "ada@example.com", "Ada", "user", None, True)


def user(user_id: str) -> UserView:
    return UserView(user_id, "ada@example.com", "Ada", "user", True, True, LATER)


def test_bounded_cache_keeps_the_most_recently_used() -> None:
    cache: BoundedCache[str, int] = BoundedCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # b is now the oldest
    cache.put("c", 3)
    assert (cache.get("a"), cache.get("b"), cache.get("c"), len(cache)) == (1, None, 3, 2)


def test_a_change_drops_what_it_concerns() -> None:
    view = IdentityView(Database("sqlite+aiosqlite:///:memory:"))
    view.sessions.put("s1", SessionView("s1", "u1", LATER, revoked=False))
    view.sessions.put("s2", SessionView("s2", "u1", LATER, revoked=False))
    view.sessions.put("s3", SessionView("s3", "u2", LATER, revoked=False))
    view.users.put("u1", user("u1"))
    view.users.put("u2", user("u2"))
    view.keys.put("h1", key("k1", "u1"))
    view.keys.put("h2", key("k2", "u2"))
    view.keys.put("nothing", False)
    view.apply("session", "s3")
    assert "s3" not in view.sessions and "s1" in view.sessions
    view.apply("api_key", "k2")
    assert "h2" not in view.keys and "h1" in view.keys and "nothing" in view.keys
    view.apply("user", "u1")
    assert "u1" not in view.users and "s1" not in view.sessions and "s2" not in view.sessions
    assert "h1" not in view.keys and "u2" in view.users
    generation = view.generation
    view.apply("something-new", "x")
    assert len(view.users) == len(view.sessions) == len(view.keys) == 0, "an unknown kind drops everything"
    assert view.generation > generation


def test_freshness_follows_the_last_read() -> None:
    now = [100.0]
    view = IdentityView(Database("sqlite+aiosqlite:///:memory:"), bound=1.0, clock=lambda: now[0])
    assert not view.fresh, "never read: not trusted"
    view.synced_at = now[0]
    now[0] += 1.0
    assert view.fresh
    now[0] += 0.01
    assert not view.fresh


@pytest.fixture
def api(database_url: str) -> Iterator[Api]:
    with running_api(settings_for(database_url, rate_limit="100000/minute")) as running:
        running.create_user()
        yield running


def count_queries(api: Api) -> list[str]:
    """Every statement the service's engine runs from now on."""
    from sqlalchemy import event

    statements: list[str] = []

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "identity_changes" not in statement:  # the log reader's own reads
            statements.append(statement)

    event.listen(api.identity.database.engine.sync_engine, "before_cursor_execute", before)
    return statements


def test_a_known_token_or_key_costs_no_query(api: Api) -> None:
    bearer = api.bearer()
    key = {"X-API-Key": api.new_key(bearer)["key"]}
    for headers in (bearer, key):
        assert api.client.get("/api/v1/users/me", headers=headers).status_code == 200  # first sight
    statements = count_queries(api)
    for _ in range(5):
        assert api.client.get("/api/v1/users/me", headers=bearer).status_code == 200
        assert api.client.get("/api/v1/users/me", headers=key).status_code == 200
    assert statements == [], statements


def test_revocations_hold_at_once_on_this_instance(api: Api) -> None:
    bearer = api.bearer()
    created = api.new_key(bearer)
    key = {"X-API-Key": created["key"]}
    assert api.client.get("/api/v1/users/me", headers=key).status_code == 200
    assert api.client.delete(f"/api/v1/api-keys/{created['id']}", headers=bearer).status_code == 204
    assert api.client.get("/api/v1/users/me", headers=key).status_code == 401
    assert api.client.get("/api/v1/users/me", headers=bearer).status_code == 200
    assert api.client.post("/api/v1/auth/logout", headers=bearer | SAME_ORIGIN).status_code == 204
    assert api.client.get("/api/v1/users/me", headers=bearer).status_code == 401


def test_role_and_feature_changes_reach_the_principal(api: Api) -> None:
    from thallus.server.identity.service import ClientInfo

    bearer = api.bearer()
    assert api.client.get("/api/v1/users/me", headers=bearer).json()["role"] == "user"
    ada = api.run(api.identity.user_by_email, "ada@example.com")
    api.run(api.identity.update_user, ada.id, ClientInfo(), role="admin", api_access=False)
    me = api.client.get("/api/v1/users/me", headers=bearer).json()
    assert (me["role"], me["features"]) == ("admin", [])
    assert api.client.get("/api/v1/audit-logs", headers=bearer).status_code == 200, "now an admin"
    api.run(api.identity.update_user, ada.id, ClientInfo(), is_active=False)
    assert api.client.get("/api/v1/users/me", headers=bearer).status_code == 401, "deactivated"


def test_a_load_racing_a_change_is_not_kept(api: Api) -> None:
    bearer = api.bearer()
    view = api.identity.view
    view.sessions.clear()
    original = api.identity.database.session

    def session_then_change() -> Any:
        view.apply("user", "someone")  # a change applied while this load is in flight
        return original()

    api.identity.database.session = session_then_change  # type: ignore[method-assign]
    try:
        assert api.client.get("/api/v1/users/me", headers=bearer).status_code == 200
    finally:
        api.identity.database.session = original  # type: ignore[method-assign]
    assert len(view.sessions) == 0, "served, not cached"


def test_a_stale_view_asks_the_database(api: Api) -> None:
    """Changes the view never heard of (a database edit) are refused once it is stale."""
    bearer = api.bearer()
    assert api.client.get("/api/v1/users/me", headers=bearer).status_code == 200
    view = api.identity.view

    async def revoke_behind_its_back() -> None:
        from sqlalchemy import update

        from thallus.server.storage.models import Session

        async with api.identity.database.session() as db:
            await db.execute(update(Session).values(revoked_at=datetime.now(UTC)))
            await db.commit()

    api.run(revoke_behind_its_back)
    assert api.client.get("/api/v1/users/me", headers=bearer).status_code == 200, "fresh: memory decides"
    api.run(view.stop)  # its reads stop, as if they had failed ...
    view.synced_at -= view.bound + 5  # ... for longer than the bound
    assert api.client.get("/api/v1/users/me", headers=bearer).status_code == 401, "stale: the database decides"


def test_the_log_is_read_and_pruned(api: Api) -> None:
    view = api.identity.view

    async def scenario() -> tuple[int, int]:
        async with api.identity.database.session() as db:
            old = datetime.now(UTC) - timedelta(days=2)
            db.add(IdentityChange(kind="session", subject_id="gone", created_at=old))
            await view.record(db, "session", "s-new")
            await db.commit()
        view.sessions.put("s-new", SessionView("s-new", "u", LATER, revoked=False))
        await view.catch_up()
        return len(view.sessions), await view.prune()

    remaining, pruned = api.run(scenario)
    assert remaining == 0, "the new change dropped the session"
    assert pruned == 1


def test_a_view_that_recovers_starts_empty() -> None:
    async def scenario() -> None:
        view = IdentityView(Database("sqlite+aiosqlite:///:memory:"), bound=0.5)
        view.users.put("u1", user("u1"))
        view.synced_at = -1e9  # stale
        await view.database.migrate()
        await view.catch_up()
        assert view.fresh and len(view.users) == 0
        await view.database.dispose()

    asyncio.run(scenario())
