"""The reference API (docs/design.md §9) on SQLite and on PostgreSQL: sessions, rotation, keys, errors."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update

from tests.service import PASSWORD, PUBLIC, SAME_ORIGIN, SPA, Api, running_api, settings_for
from thallus.server.identity.service import LOGIN_FAILED_MESSAGE
from thallus.server.storage.models import ApiKey, Session

SHAPE = {"error", "message", "details", "correlation_id"}


@pytest.fixture
def api(database_url: str) -> Iterator[Api]:
    with running_api(settings_for(database_url)) as running:
        yield running


def assert_error(response: Any, status: int, error: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == SHAPE
    assert body["error"] == error
    assert body["correlation_id"] == response.headers["x-correlation-id"]
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-frame-options"] == "DENY"
    return body


# -- register and login -------------------------------------------------------------------------


def test_register_then_login(api: Api) -> None:
    created = api.client.post(
        "/api/v1/auth/register",
        json={"email": "Grace@Example.com", "password": PASSWORD, "name": "Grace"},
        headers=SAME_ORIGIN,
    )
    assert created.status_code == 201
    user = created.json()
    assert (user["email"], user["name"], user["role"], user["features"]) == ("grace@example.com", "Grace", "user", [])
    assert created.headers["cache-control"] == "no-store"
    login = api.login("GRACE@example.com")
    assert login.status_code == 200
    body = login.json()
    assert set(body) == {"access_token", "user", "expires_in"}
    assert body["expires_in"] == 900
    assert body["user"] == {"id": user["id"], "email": "grace@example.com", "name": "Grace"}
    assert login.headers["cache-control"] == "no-store"
    me = api.client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert me.status_code == 200
    assert me.json()["id"] == user["id"]


def test_register_refuses_duplicates_and_weak_passwords(api: Api) -> None:
    api.create_user("ada@example.com")
    duplicate = api.client.post(
        "/api/v1/auth/register", json={"email": "ADA@example.com", "password": PASSWORD}, headers=SAME_ORIGIN
    )
    assert_error(duplicate, 409, "ConflictError")
    weak = api.client.post(
        "/api/v1/auth/register", json={"email": "bob@example.com", "password": "short1!"}, headers=SAME_ORIGIN
    )
    body = assert_error(weak, 422, "ValidationError")
    assert {item["msg"] for item in body["details"]} == {
        "length must be 12–128 characters",
        "needs an upper-case letter",
    }
    assert all(item["input"] == "[redacted]" for item in body["details"])
    assert "short1!" not in weak.text
    invalid_email = api.client.post(
        "/api/v1/auth/register", json={"email": "not-an-email", "password": PASSWORD}, headers=SAME_ORIGIN
    )
    assert assert_error(invalid_email, 422, "ValidationError")["details"][0]["loc"] == ["body", "email"]


@pytest.mark.parametrize(
    ("password", "missing"),
    [("alllowercase-123", "needs an upper-case letter"), ("ALLUPPERCASE-123", "needs a lower-case letter"),
     ("No-Digits-Here!!", "needs a digit"), ("NoSpecial123456", "needs a special character"),
     ("A1-" + "x" * 126, "length must be 12–128 characters")],
)  # fmt: skip
def test_password_policy_rules(api: Api, password: str, missing: str) -> None:
    response = api.client.post(
        "/api/v1/auth/register", json={"email": "p@example.com", "password": password}, headers=SAME_ORIGIN
    )
    assert [item["msg"] for item in assert_error(response, 422, "ValidationError")["details"]] == [missing]


def test_registration_can_be_disabled(database_url: str) -> None:
    with running_api(settings_for(database_url, registration_enabled=False)) as api:
        response = api.client.post(
            "/api/v1/auth/register", json={"email": "x@example.com", "password": PASSWORD}, headers=SAME_ORIGIN
        )
        assert_error(response, 403, "PermissionDeniedError")


def test_unknown_email_and_wrong_password_answer_identically(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    api.create_user()
    verifications: list[str] = []
    hasher = api.identity.hasher
    original_verify = hasher._verify

    def counting_verify(password_hash: str, password: str) -> bool:
        verifications.append("verify")
        return original_verify(password_hash, password)

    monkeypatch.setattr(hasher, "_verify", counting_verify)
    wrong = api.login("ada@example.com", "Wrong-Password-123!")
    unknown = api.login("nobody@example.com", "Wrong-Password-123!")
    for response in (wrong, unknown):
        body = assert_error(response, 401, "AuthenticationError")
        assert body["message"] == LOGIN_FAILED_MESSAGE
        assert body["details"] is None
    assert set(wrong.headers) - {"x-correlation-id", "date"} == set(unknown.headers) - {"x-correlation-id", "date"}
    assert verifications == ["verify", "verify"], "an unknown e-mail costs one Argon2 verification too"
    assert api.audit.actions().count("login_failed") == 2


def test_login_accepts_only_json(api: Api) -> None:
    api.create_user()
    form = api.client.post(
        "/api/v1/auth/login",
        content=f"email=ada@example.com&password={PASSWORD}",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert_error(form, 415, "UnsupportedMediaTypeError")
    text = api.client.post("/api/v1/auth/login", content=b'{"email": "a"}', headers={"Content-Type": "text/plain"})
    assert_error(text, 415, "UnsupportedMediaTypeError")


def test_bad_json_is_a_400(api: Api) -> None:
    response = api.client.post(
        "/api/v1/auth/login",
        content=b'{"email": "a@b.c", "password": "hunter2',
        headers={"Content-Type": "application/json"},
    )
    assert_error(response, 400, "BadRequestError")
    assert "hunter2" not in response.text


def test_validation_errors_never_echo_secrets(api: Api) -> None:
    response = api.client.post("/api/v1/auth/login", json={"email": ["x"], "password": "hunter2-secret-X1!"})
    body = assert_error(response, 422, "ValidationError")
    assert "hunter2" not in response.text
    assert all(set(item) == {"type", "loc", "msg", "input"} for item in body["details"])
    missing = api.client.post("/api/v1/auth/login", json={"password": "hunter2-secret-X1!"})
    assert "hunter2" not in missing.text


@pytest.mark.parametrize(
    ("headers", "allowed"),
    [({}, True), ({"Origin": SPA}, True), ({"Origin": PUBLIC}, True), ({"Sec-Fetch-Site": "same-origin"}, True),
     ({"Origin": "https://evil.example"}, False), ({"Origin": "null"}, False),
     ({"Sec-Fetch-Site": "cross-site"}, False), ({"Sec-Fetch-Site": "cross-site", "Origin": SPA}, True),
     ({"Referer": "https://evil.example/login"}, False)],
)  # fmt: skip
def test_login_csrf(api: Api, headers: dict[str, str], allowed: bool) -> None:
    api.create_user()
    response = api.client.post(
        "/api/v1/auth/login", json={"email": "ada@example.com", "password": PASSWORD}, headers=headers
    )
    if allowed:
        assert response.status_code == 200
    else:
        assert_error(response, 403, "CSRFError")
        assert "csrf_rejected" in api.audit.actions()
        assert "thallus_refresh" not in response.headers.get("set-cookie", "")


# -- the refresh cookie -------------------------------------------------------------------------


def refresh_cookie_header(response: Any) -> str:
    cookies = [value for name, value in response.headers.multi_items() if name == "set-cookie"]
    assert len(cookies) == 1
    return str(cookies[0])


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ("development", "Path=/api/v1/auth; Max-Age=2592000; HttpOnly; SameSite=Lax"),
        ("test", "Path=/api/v1/auth; Max-Age=2592000; Secure; HttpOnly; SameSite=Strict"),
        ("production", "Path=/api/v1/auth; Max-Age=2592000; Secure; HttpOnly; SameSite=Strict"),
    ],
)
def test_cookie_attributes_per_environment(database_url: str, env: str, expected: str) -> None:
    with running_api(settings_for(database_url, env=env)) as api:
        api.create_user()
        cookie = refresh_cookie_header(api.login())
        name_value, _, attributes = cookie.partition("; ")
        name = "thallus_refresh" if env == "development" else "__Secure-thallus_refresh"
        assert name_value.startswith(name + "=") and len(name_value) > 40
        assert attributes == expected


def refresh(api: Api, **headers: str) -> Any:
    return api.client.post("/api/v1/auth/refresh", headers={**SAME_ORIGIN, **headers})


def test_refresh_rotates_the_cookie(api: Api) -> None:
    api.create_user()
    first = api.login()
    first_cookie = api.client.cookies.get(api.cookie_name)
    rotated = refresh(api)
    assert rotated.status_code == 200
    body = rotated.json()
    assert set(body) == {"access_token", "user", "expires_in"}
    assert body["access_token"] != first.json()["access_token"]
    assert api.client.cookies.get(api.cookie_name) not in (None, first_cookie)
    assert rotated.headers["cache-control"] == "no-store"
    assert refresh(api).status_code == 200, "the new cookie works"


def test_reusing_a_rotated_token_revokes_the_family(api: Api) -> None:
    api.create_user()
    login = api.login()
    stolen = api.client.cookies.get(api.cookie_name)
    assert refresh(api).status_code == 200
    current = api.client.cookies.get(api.cookie_name)
    assert stolen and current
    # the thief replays the old token
    api.client.cookies.set(api.cookie_name, stolen, domain="api.example.com", path="/api/v1/auth")
    replay = refresh(api)
    assert_error(replay, 401, "AuthenticationError")
    assert "already used" in replay.json()["message"]
    assert f"{api.cookie_name}=" in replay.headers["set-cookie"] and "Max-Age=0" in replay.headers["set-cookie"]
    assert "token_reuse_detected" in api.audit.actions()
    # the legitimate holder's newer token is dead too, and so is the session's access token
    api.client.cookies.set(api.cookie_name, current, domain="api.example.com", path="/api/v1/auth")
    assert_error(refresh(api), 401, "AuthenticationError")
    token = login.json()["access_token"]
    assert_error(
        api.client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {token}"}), 401, "AuthenticationError"
    )


def test_other_sessions_survive_a_reuse(api: Api) -> None:
    api.create_user()
    other = api.bearer()
    api.login()
    stolen = api.client.cookies.get(api.cookie_name)
    assert stolen
    refresh(api)
    api.client.cookies.set(api.cookie_name, stolen, domain="api.example.com", path="/api/v1/auth")
    refresh(api)
    assert api.client.get("/api/v1/users/me", headers=other).status_code == 200


def test_refresh_needs_a_cookie_and_origin_evidence(api: Api) -> None:
    assert_error(api.client.post("/api/v1/auth/refresh", headers=SAME_ORIGIN), 401, "AuthenticationError")
    api.create_user()
    api.login()
    assert_error(api.client.post("/api/v1/auth/refresh"), 403, "CSRFError")  # cookie, no evidence: test env
    cross = api.client.post("/api/v1/auth/refresh", headers={"Origin": "https://evil.example"})
    assert_error(cross, 403, "CSRFError")
    assert api.client.post("/api/v1/auth/refresh", headers={"Origin": SPA}).status_code == 200


def test_garbage_refresh_cookie_is_a_401(api: Api) -> None:
    for garbage in ("garbage", "=;;=", "x" * 4000):
        response = api.client.post(
            "/api/v1/auth/refresh", headers={**SAME_ORIGIN, "Cookie": f"{api.cookie_name}={garbage}"}
        )
        assert_error(response, 401, "AuthenticationError")


def test_inactivity_timeout(database_url: str) -> None:
    with running_api(settings_for(database_url, session_inactivity_timeout=600)) as api:
        api.create_user()
        api.login()

        async def idle_for_an_hour() -> None:
            async with api.identity.database.session() as db:
                await db.execute(update(Session).values(last_used_at=datetime.now(UTC) - timedelta(hours=1)))
                await db.commit()

        api.run(idle_for_an_hour)
        body = assert_error(refresh(api), 401, "AuthenticationError")
        assert "inactivity" in body["message"]
        assert_error(refresh(api), 401, "AuthenticationError")  # and the session stays ended


def test_logout_ends_the_session(api: Api) -> None:
    api.create_user()
    token = api.login().json()["access_token"]
    response = api.client.post("/api/v1/auth/logout", headers=SAME_ORIGIN)
    assert response.status_code == 204
    assert "Max-Age=0" in response.headers["set-cookie"]
    assert_error(
        api.client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {token}"}), 401, "AuthenticationError"
    )
    assert "logout" in api.audit.actions()
    again = api.client.post("/api/v1/auth/logout", headers=SAME_ORIGIN)
    assert again.status_code == 204, "idempotent"


def test_logout_without_a_credential_clears_nothing(api: Api) -> None:
    """A cross-site form carries no cookie (SameSite): answering it with a clearing Set-Cookie would
    let any site sign the user out."""
    response = api.client.post("/api/v1/auth/logout", headers={"Cookie": ""})
    assert response.status_code == 204
    assert "set-cookie" not in response.headers


def test_logout_with_bearer_only(api: Api) -> None:
    api.create_user()
    headers = api.bearer()
    api.client.cookies.clear()
    assert api.client.post("/api/v1/auth/logout", headers=headers).status_code == 204
    assert_error(api.client.get("/api/v1/users/me", headers=headers), 401, "AuthenticationError")


# -- password change --------------------------------------------------------------------------


def test_password_change_revokes_every_session_at_once(api: Api) -> None:
    api.create_user()
    phone = api.bearer()
    laptop_login = api.login()
    laptop = {"Authorization": f"Bearer {laptop_login.json()['access_token']}"}
    new_password = "Another-Horse-Battery-7?"
    changed = api.client.post(
        "/api/v1/auth/password",
        json={"current_password": PASSWORD, "new_password": new_password},
        headers={**laptop, **SAME_ORIGIN},
    )
    assert changed.status_code == 204
    for headers in (phone, laptop):
        assert_error(api.client.get("/api/v1/users/me", headers=headers), 401, "AuthenticationError")
    assert_error(refresh(api), 401, "AuthenticationError")
    assert_error(api.login(), 401, "AuthenticationError")
    assert api.login(password=new_password).status_code == 200
    assert "password_change" in api.audit.actions()


def test_password_change_checks_the_current_password_and_policy(api: Api) -> None:
    api.create_user()
    headers = {**api.bearer(), **SAME_ORIGIN}
    wrong = api.client.post(
        "/api/v1/auth/password",
        json={"current_password": "Wrong-Password-1!", "new_password": "Another-Horse-7?"},
        headers=headers,
    )
    assert_error(wrong, 403, "PermissionDeniedError")
    weak = api.client.post(
        "/api/v1/auth/password", json={"current_password": PASSWORD, "new_password": "weak"}, headers=headers
    )
    body = assert_error(weak, 422, "ValidationError")
    assert body["details"][0]["loc"] == ["body", "new_password"]
    assert api.client.get("/api/v1/users/me", headers=headers).status_code == 200, "nothing changed"


def test_password_change_needs_a_session_not_an_api_key(api: Api) -> None:
    api.create_user()
    key = api.new_key(api.bearer())["key"]
    response = api.client.post(
        "/api/v1/auth/password",
        json={"current_password": PASSWORD, "new_password": "Another-Horse-7?"},
        headers={"X-API-Key": key},
    )
    assert_error(response, 403, "PermissionDeniedError")


def test_password_change_needs_authentication(api: Api) -> None:
    response = api.client.post("/api/v1/auth/password", json={"current_password": "a", "new_password": "b"})
    assert_error(response, 401, "AuthenticationError")
    assert response.headers["www-authenticate"].startswith("Bearer")


# -- access tokens ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer not.a.jwt",
        "Bearer ",
        "Basic YWRhOnB3",
        "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.",
        "bearer",
        "Token abc",
    ],
)
def test_bad_access_tokens_are_401(api: Api, authorization: str) -> None:
    response = api.client.get("/api/v1/users/me", headers={"Authorization": authorization})
    assert_error(response, 401, "AuthenticationError")
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_tampered_and_foreign_tokens_are_refused(api: Api, database_url: str) -> None:
    import jwt

    api.create_user()
    token = api.login().json()["access_token"]
    header, payload, signature = token.split(".")
    tampered = f"{header}.{payload}.{signature[:-2]}AA"
    assert_error(
        api.client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {tampered}"}), 401, "AuthenticationError"
    )
    claims = jwt.decode(token, options={"verify_signature": False})
    kid = jwt.get_unverified_header(token)["kid"]
    forged = jwt.encode(claims, "a-guessed-secret-of-reasonable-length!!", algorithm="HS256", headers={"kid": kid})
    assert_error(
        api.client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {forged}"}), 401, "AuthenticationError"
    )
    unsigned = jwt.encode(claims, None, algorithm="none", headers={"kid": kid})
    assert_error(
        api.client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {unsigned}"}), 401, "AuthenticationError"
    )


def test_signing_keys_rotate(database_url: str) -> None:
    with running_api(settings_for(database_url)) as old:
        old.create_user()
        token = old.login().json()["access_token"]
    rotated = settings_for(database_url, secret_key="n" * 48, previous_secret_keys="t" * 48)
    with running_api(rotated) as new:
        assert new.client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        new_token = new.login().json()["access_token"]
        import jwt

        assert jwt.get_unverified_header(new_token)["kid"] != jwt.get_unverified_header(token)["kid"]
    without_previous = settings_for(database_url, secret_key="n" * 48)
    with running_api(without_previous) as strict:
        assert_error(
            strict.client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {token}"}),
            401,
            "AuthenticationError",
        )


def test_one_credential_per_request(api: Api) -> None:
    api.create_user()
    headers = api.bearer()
    key = api.new_key(headers)["key"]
    both = api.client.get("/api/v1/users/me", headers={**headers, "X-API-Key": key})
    assert_error(both, 400, "BadRequestError")


# -- API keys -----------------------------------------------------------------------------------


def test_api_key_lifecycle(api: Api) -> None:
    api.create_user()
    headers = api.bearer()
    created = api.new_key(headers, name="build server")
    raw = created["key"]
    assert raw.startswith("thal_") and len(raw) == 5 + 43
    assert created["preview"] == f"thal_{raw[5:9]}...{raw[-4:]}"
    assert created["name"] == "build server"
    me = api.client.get("/api/v1/users/me", headers={"X-API-Key": raw})
    assert me.status_code == 200
    listed = api.client.get("/api/v1/api-keys", headers=headers).json()
    assert [item["id"] for item in listed] == [created["id"]]
    assert "key" not in listed[0] and raw not in str(listed)
    assert listed[0]["preview"] == created["preview"]
    revoked = api.client.delete(f"/api/v1/api-keys/{created['id']}", headers=headers)
    assert revoked.status_code == 204
    assert_error(api.client.get("/api/v1/users/me", headers={"X-API-Key": raw}), 401, "AuthenticationError")
    assert {"api_key_create", "api_key_revoke"} <= set(api.audit.actions())


def test_api_key_creation_needs_the_feature(api: Api) -> None:
    api.create_user(api_access=False)
    response = api.client.post("/api/v1/api-keys", json={"name": "x"}, headers=api.bearer())
    assert_error(response, 403, "PermissionDeniedError")
    assert "permission_denied" in api.audit.actions()


def test_expired_key(api: Api) -> None:
    api.create_user()
    headers = api.bearer()
    soon = datetime.now(UTC) + timedelta(hours=1)
    key = api.new_key(headers, expires_at=soon.isoformat())
    assert api.client.get("/api/v1/users/me", headers={"X-API-Key": key["key"]}).status_code == 200

    async def expire() -> None:
        async with api.identity.database.session() as db:
            await db.execute(update(ApiKey).values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
            await db.commit()
        api.identity.view.apply("api_key", key["id"])  # an edit behind the service's back: drop the record

    api.run(expire)
    body = assert_error(
        api.client.get("/api/v1/users/me", headers={"X-API-Key": key["key"]}), 401, "AuthenticationError"
    )
    assert "expired" in body["message"]
    past = api.client.post(
        "/api/v1/api-keys", json={"name": "x", "expires_at": "2001-01-01T00:00:00Z"}, headers=headers
    )
    assert_error(past, 422, "ValidationError")


@pytest.mark.parametrize("raw", ["thal_short", "thal_" + "A" * 43, "nope", "thal_" + "é" * 43, ""])
def test_invalid_keys_are_401(api: Api, raw: str) -> None:
    response = api.client.get("/api/v1/users/me", headers={b"X-API-Key": raw.encode("utf-8")})
    assert_error(response, 401, "AuthenticationError")


def test_only_the_owner_can_revoke(api: Api) -> None:
    api.create_user("ada@example.com")
    api.create_user("bob@example.com")
    key = api.new_key(api.bearer("ada@example.com"))
    response = api.client.delete(f"/api/v1/api-keys/{key['id']}", headers=api.bearer("bob@example.com"))
    assert_error(response, 404, "NotFoundError")
    assert api.client.get("/api/v1/users/me", headers={"X-API-Key": key["key"]}).status_code == 200


def test_key_management_needs_a_session(api: Api) -> None:
    """docs/design.md §9: a key cannot mint, list or revoke keys, nor change the password."""
    api.create_user()
    bearer = api.bearer()
    first, second = api.new_key(bearer), api.new_key(bearer, name="second")
    key = {"X-API-Key": first["key"]}
    refused = [
        api.client.post("/api/v1/api-keys", json={"name": "made by a key"}, headers=key),
        api.client.get("/api/v1/api-keys", headers=key),
        api.client.delete(f"/api/v1/api-keys/{second['id']}", headers=key),
        api.client.post(
            "/api/v1/auth/password", json={"current_password": PASSWORD, "new_password": "x"}, headers=key | SAME_ORIGIN
        ),
    ]
    for response in refused:
        assert_error(response, 403, "PermissionDeniedError")
    denied = [e for e in api.audit.events if e.action == "permission_denied"]
    assert len(denied) == 4
    assert all(e.details is not None and e.details["needs"] == "session" for e in denied)
    assert {e.details["api_key_id"] for e in denied if e.details} == {first["id"]}
    assert api.audit.actions().count("api_key_create") == 2, "nothing was created by the key"
    assert api.client.get("/api/v1/users/me", headers={"X-API-Key": second["key"]}).status_code == 200
    assert len(api.client.get("/api/v1/api-keys", headers=bearer).json()) == 2


def test_last_used_is_buffered_not_written_per_request(api: Api) -> None:
    api.create_user()
    headers = api.bearer()
    key = api.new_key(headers)
    for _ in range(3):
        assert api.client.get("/api/v1/users/me", headers={"X-API-Key": key["key"]}).status_code == 200

    async def stored_last_used() -> datetime | None:
        async with api.identity.database.session() as db:
            stored = await db.get(ApiKey, key["id"])
            assert stored is not None
            return stored.last_used_at

    assert api.run(stored_last_used) is None, "no write per request"
    listed = api.client.get("/api/v1/api-keys", headers=headers).json()[0]
    assert listed["last_used_at"] is not None, "this instance reports the buffered time"
    api.run(api.identity.flush_last_used)
    assert api.run(stored_last_used) is not None


def test_revocation_reaches_other_instances_within_the_bound(database_url: str) -> None:
    """Two services on one database: a key revoked on one is refused there at once and by the other
    within the identity view's bound (1 s), which decided it from memory until then."""
    import time

    settings = settings_for(database_url)
    with running_api(settings) as first, running_api(settings) as second:
        first.create_user()
        headers = first.bearer()
        created = first.new_key(headers)
        key = {"X-API-Key": created["key"]}
        assert second.client.get("/api/v1/users/me", headers=key).status_code == 200
        assert first.client.delete(f"/api/v1/api-keys/{created['id']}", headers=headers).status_code == 204
        revoked_at = time.monotonic()
        assert first.client.get("/api/v1/users/me", headers=key).status_code == 401, "at once here"
        while second.client.get("/api/v1/users/me", headers=key).status_code != 401:
            assert time.monotonic() - revoked_at < second.identity.view.bound + 0.5, "within the bound there"
            time.sleep(0.02)


# -- CSRF and API keys ------------------------------------------------------------------------


def test_csrf_exemption_only_for_valid_keys(api: Api) -> None:
    api.create_user()
    headers = api.bearer()  # leaves the refresh cookie in the client: requests carry a cookie
    assert api.client.cookies.get(api.cookie_name)
    raw = api.new_key(headers | SAME_ORIGIN)["key"]
    cross_site = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}
    # cookies are scoped to /api/v1/auth: send one explicitly to a key-authenticated endpoint
    cookie = {"Cookie": f"{api.cookie_name}={api.client.cookies.get(api.cookie_name)}"}
    valid = api.client.post("/api/v1/api-keys", json={"name": "x"}, headers={**cross_site, **cookie, "X-API-Key": raw})
    # past CSRF to the route, which refuses keys for key management (a session is needed)
    assert_error(valid, 403, "PermissionDeniedError")
    forged = api.client.post(
        "/api/v1/api-keys", json={"name": "x"}, headers={**cross_site, **cookie, "X-API-Key": "thal_" + "B" * 43}
    )
    assert_error(forged, 401, "AuthenticationError")
    no_key = api.client.post("/api/v1/auth/logout", headers=cross_site)
    assert_error(no_key, 403, "CSRFError")


# -- everything else ----------------------------------------------------------------------------


def test_health(api: Api) -> None:
    response = api.client.get("/health")
    assert response.json() == {"status": "ok"}
    assert api.client.head("/health").status_code == 200


def test_routing_errors_have_the_shape(api: Api) -> None:
    assert_error(api.client.get("/api/v1/nowhere"), 404, "NotFoundError")
    body = assert_error(api.client.put("/api/v1/users/me"), 405, "MethodNotAllowedError")
    assert body["details"] == {"allowed_methods": ["GET"]}
    assert_error(api.client.get("/api/v1/users/me"), 401, "AuthenticationError")


def test_docs_have_their_own_narrow_csp(api: Api) -> None:
    page = api.client.get("/docs")
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    nonce = page.text.split('<script nonce="')[1].split('"')[0]
    assert f"script-src 'self' 'nonce-{nonce}'" in csp
    assert "unsafe-inline" not in csp and "cdn" not in page.text
    assert "frame-ancestors 'none'" in csp
    asset = api.client.get("/docs/assets/swagger-ui-bundle.js")
    assert asset.status_code == 200 and asset.headers["content-type"].startswith("text/javascript")
    assert asset.headers["content-security-policy"].startswith("default-src 'self'; object-src 'none'")
    assert_error(api.client.get("/docs/assets/../../etc/passwd"), 404, "NotFoundError")
    schema = api.client.get("/openapi.json").json()
    assert "/api/v1/auth/login" in schema["paths"]
    other = api.client.get("/health").headers["content-security-policy"]
    assert other == "default-src 'self'; object-src 'none'; base-uri 'self'; frame-ancestors 'none'; form-action 'self'"


def test_docs_can_be_disabled(database_url: str) -> None:
    with running_api(settings_for(database_url, docs_enabled=False)) as api:
        assert_error(api.client.get("/docs"), 404, "NotFoundError")
        assert_error(api.client.get("/openapi.json"), 404, "NotFoundError")


@pytest.mark.parametrize("path", ["/api/v1/auth/login/", "/api/v1/users/me/", "/health/"])
def test_no_redirect_is_built_from_the_request(api: Api, path: str) -> None:
    """A trailing slash is a 404, never a redirect to the client's Host (issue: Host-header redirects)."""
    response = api.client.post(path, json={}, headers={"Host": "evil.example", **SAME_ORIGIN}, follow_redirects=False)
    assert "location" not in response.headers
    assert_error(response, 404, "NotFoundError")
