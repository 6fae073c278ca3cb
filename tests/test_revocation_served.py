"""Every revocation path of the identity view, served (docs/design.md §12; README, "Decided from memory,
revoked everywhere within 1 s"): a token or key revoked on one instance is refused there at once
and by every other instance within the bound; a broken notification channel makes an instance
fall back to the database (503 while that is unreachable), never accept.

Two set-ups, each with real ``thallus serve`` processes (production profile):

* ``postgresql`` — instances A and B, two processes on one PostgreSQL database (a database of this
  module's own), each with one keep-alive connection from here;
* ``sqlite`` — one ``thallus serve --workers 2`` on one data directory. Requests land on either
  worker, so the test opens keep-alive connections until it holds one on each worker (which worker
  owns a connection is read from ``/proc``: the process holding the server side of its socket) and
  uses them as "A" and "B"; after the bound, 20 requests on fresh connections (either worker) must
  all be refused too.

For each path the credential is warmed on both (a 200 on each, so its records are in both views),
the change is made through A (or by the ``thallus users set`` CLI, a process of its own on the
same database), then:

* through A: the very next request to A is refused (its own change applies at once);
* B (and for CLI changes both) is polled every 20 ms. The clock starts at the change's own row in
  ``identity_changes`` (its ``created_at``, written in the change's transaction just before the
  commit — so the delays printed are upper bounds), or at ``expires_at`` for a key that expires. A
  request *sent* more than BOUND + ALLOWANCE after it that is still accepted fails the test. The
  ALLOWANCE of 0.25 s is for what lies outside the view's own bound: the view's read takes time
  between its snapshot and the moment it counts as done (its freshness runs from the latter), B's
  event loop answers when it gets the CPU on a shared 2-CPU machine, and the 20 ms poll step.
  Expiry has no such allowance: it is a time checked on every request, so a request sent after
  ``expires_at`` must be refused by every instance.

The delays are printed (``pytest -s``); only the bound is asserted. On the SQLite workers each
request over a kept-alive connection takes ~45 ms (``thallus serve --workers N`` leaves Nagle on:
see benchmarks/bench_revocation.py, ``FreshProbe``), which coarsens those figures, not the bound;
benchmarks/bench_revocation.py measures the delays finely.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from tests.databases import create_postgres_database, drop_postgres_database
from tests.server import THALLUS, Server, running_server
from tests.tcp_proxy import tcp_proxy
from thallus.server.storage import Database
from thallus.server.storage.models import IdentityChange

#: The view's freshness bound (docs/design.md §12: "within 1 s for another instance's").
BOUND = 1.0
#: What the client loop and the machine add beyond the bound (see the module's docstring).
ALLOWANCE = 0.25
POLL = 0.02
#: Requests on fresh connections after the bound (SQLite workers: either worker answers each).
AFTER_BOUND_REQUESTS = 20
PASSWORD = "Correct-Horse-Battery-9!"
NEW_PASSWORD = "Another-Horse-Battery-7?"
PUBLIC = "https://api.example.com"
SAME_ORIGIN = {"Origin": PUBLIC, "Sec-Fetch-Site": "same-origin"}
REFRESH_COOKIE = "__Secure-thallus_refresh"  # outside development; path /api/v1/auth
GENEROUS = "1000000/minute"
#: Makes a change: a request through A (returns once answered), or starts a CLI process.
Change = Callable[[], "subprocess.Popen[str] | None"]


def environment(*, database_url: str | None = None, data_dir: Path | None = None) -> dict[str, str]:
    """The production profile with a 48-character secret, cheap Argon2 and limits nothing reaches."""
    settings = {
        "THALLUS_ENV": "production",
        "THALLUS_SECRET_KEY": "revocation-served-secret-" + "s" * 23,
        "THALLUS_ALLOWED_ORIGINS": "https://app.example.com",
        "THALLUS_PUBLIC_ORIGIN": PUBLIC,
        "THALLUS_RATE_LIMIT": GENEROUS,
        "THALLUS_RATE_LIMIT_AUTH": GENEROUS,
        "THALLUS_ARGON2_TIME_COST": "1",
        "THALLUS_ARGON2_MEMORY_COST": "19456",
        "THALLUS_ARGON2_PARALLELISM": "1",
        "THALLUS_KEEP_ALIVE_TIMEOUT": "600",  # a pinned connection stays on its worker between paths
        "THALLUS_LOG_LEVEL": "WARNING",
    }
    if database_url is not None:
        settings["THALLUS_DATABASE_URL"] = database_url
    if data_dir is not None:
        settings["THALLUS_DATA_DIR"] = str(data_dir)
    return settings


# -- servers, their logs, and which worker holds a connection ----------------------------------


class Log:
    """A server's output, as tests.server.Server reads it (a thread, so a full pipe never blocks it)."""

    def __init__(self, server: Server) -> None:
        self._server = server

    @property
    def lines(self) -> list[str]:
        return [line.rstrip("\n") for line in list(self._server.lines)]

    def messages(self, text: str) -> list[str]:
        return [line for line in self.lines if text in line]


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1], 16)


def socket_owner(server_pid: int, server_port: int, client_port: int) -> int | None:
    """The process (the server or one of its workers) holding the server side of the loopback
    connection from ``client_port``: its socket's inode in ``/proc/net/tcp``, then the fd."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table, encoding="ascii") as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if _port(fields[1]) == server_port and _port(fields[2]) == client_port and fields[3] == "01":
                    inode = fields[9]
    if inode is None:
        return None
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
    for pid in [server_pid, *map(int, children)]:
        fds = Path(f"/proc/{pid}/fd")
        try:
            for fd in fds.iterdir():
                try:
                    if os.readlink(fd) == f"socket:[{inode}]":
                        return pid
                except OSError:  # closed meanwhile
                    continue
        except OSError:
            continue
    return None


class Endpoint:
    """One keep-alive connection to one instance or worker, for requests in a fixed order.

    ``pinned`` (SQLite workers): every answer must come over the same connection (so from the same
    worker); a connection the server closed would silently reconnect to either worker."""

    def __init__(self, name: str, url: str, *, fresh: bool = False) -> None:
        self.name = name
        self.url = url
        # one connection, kept however long it idles (httpx drops an idle one after 5 s by default);
        # fresh: a new connection for every request (none is kept)
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=0 if fresh else 1, keepalive_expiry=3600)
        self.client = httpx.Client(base_url=url, timeout=10, limits=limits)
        self.client_port: int | None = None
        self.pinned = False
        #: the pid of the process holding the connection's server side (after :meth:`pin`)
        self.worker: int | None = None

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self.client.request(method, path, **kwargs)
        self.client.cookies.clear()  # credentials are always sent explicitly
        if self.pinned:
            port = local_port(response)
            assert port == self.client_port, f"{self.name}: the pinned connection was replaced ({port})"
        return response

    def pin(self, server_pid: int, server_port: int) -> int | None:
        """Which worker this connection is on (after a first request), from now on pinned to it."""
        response = self.request("GET", "/health")
        assert response.status_code == 200, response.text
        self.client_port = local_port(response)
        if self.client_port is None:
            return None
        self.pinned = True
        self.worker = socket_owner(server_pid, server_port, self.client_port)
        return self.worker

    def close(self) -> None:
        self.client.close()


def local_port(response: httpx.Response) -> int | None:
    stream = response.extensions.get("network_stream")
    try:
        address = stream.get_extra_info("client_addr") if stream is not None else None
    except OSError:  # the connection is gone
        return None
    return int(address[1]) if address else None


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def api_key(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


def session_of(token: str) -> str:
    """The ``sid`` claim of an access token (read, not verified)."""
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return str(claims["sid"])


@dataclass
class Login:
    token: str
    refresh: str
    user_id: str

    @property
    def session_id(self) -> str:
        return session_of(self.token)


def refresh_cookie(response: httpx.Response) -> str:
    for header in response.headers.get_list("set-cookie"):
        name, _, rest = header.partition("=")
        if name == REFRESH_COOKIE:
            return rest.split(";", 1)[0]
    raise AssertionError(f"no {REFRESH_COOKIE} cookie in {response.headers.get_list('set-cookie')}")


# -- a cluster: A, B, the CLI and the database -------------------------------------------------


@dataclass
class Observation:
    """How one instance followed one change: refused at once, or after ``delay`` seconds."""

    setup: str
    path: str
    instance: str
    what: str
    #: seconds from the change (its row's created_at, or expires_at) to the first refusal's answer
    delay: float
    #: the latest send time (same clock) of a request still answered the old way, if any
    last_old_sent: float | None
    polls: int

    def line(self) -> str:
        last = ""
        if self.last_old_sent is not None:
            last = f"last old answer to a request sent at {self.last_old_sent * 1000:.0f} ms"
        return (
            f"{self.setup:<10} {self.path:<13} {self.instance:<8} {self.what:<34} "
            f"{self.delay * 1000:7.1f} ms  {self.polls:3d} polls  {last}"
        )


@dataclass
class Cluster:
    setup: str
    #: the connection the changes go through ("A")
    a: Endpoint
    #: the connection that must follow within the bound ("B")
    b: Endpoint
    #: a new connection for every request, to each instance (or to the workers' one socket)
    fresh: list[Endpoint]
    env: dict[str, str]
    database_url: str
    observations: list[Observation] = field(default_factory=list)

    # set-up helpers

    def new_email(self, path: str) -> str:
        return f"{path.replace('_', '-')}-{secrets.token_hex(3)}@example.com"

    def cli(self, *args: str, stdin: str | None = None) -> str:
        done = subprocess.run(
            [THALLUS, *args], env=self.cli_env(), input=stdin, capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, f"thallus {' '.join(args)}: {done.stderr}"
        return done.stdout

    def cli_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("THALLUS_") or k.startswith("THALLUS_TEST_")}
        return {**env, **self.env}

    def user(self, path: str, *, api_access: bool = False) -> str:
        """A new user (the CLI when it needs the api_access feature, else registration through A)."""
        email = self.new_email(path)
        if api_access:
            self.cli("users", "create", "--email", email, "--password", "-", "--api-access", stdin=PASSWORD + "\n")
        else:
            created = self.a.request(
                "POST", "/api/v1/auth/register", json={"email": email, "password": PASSWORD}, headers=SAME_ORIGIN
            )
            assert created.status_code == 201, created.text
        return email

    def login(self, email: str, endpoint: Endpoint | None = None, password: str = PASSWORD) -> Login:
        response = (endpoint or self.a).request(
            "POST", "/api/v1/auth/login", json={"email": email, "password": password}, headers=SAME_ORIGIN
        )
        assert response.status_code == 200, response.text
        document = response.json()
        return Login(document["access_token"], refresh_cookie(response), document["user"]["id"])

    def new_key(self, login: Login, **body: Any) -> dict[str, Any]:
        response = self.a.request(
            "POST", "/api/v1/api-keys", json={"name": "served", **body}, headers={**bearer(login.token), **SAME_ORIGIN}
        )
        assert response.status_code == 201, response.text
        document: dict[str, Any] = response.json()
        return document

    def change_time(self, kind: str, subject_id: str) -> float:
        """When the newest change row for ``subject_id`` was written, on this process's monotonic clock."""

        async def read() -> datetime | None:
            database = Database(self.database_url)
            try:
                async with database.session() as db:
                    created: datetime | None = await db.scalar(
                        select(IdentityChange.created_at)
                        .where(IdentityChange.kind == kind, IdentityChange.subject_id == subject_id)
                        .order_by(IdentityChange.seq.desc())
                        .limit(1)
                    )
                    return created
            finally:
                await database.dispose()

        created = asyncio.run(read())
        assert created is not None, f"no identity_changes row for {kind} {subject_id}"
        return monotonic_of(created)

    def cli_change(self, *args: str) -> Change:
        """A change made by the CLI, a process of its own: started here, polled while it runs."""

        def start() -> subprocess.Popen[str]:
            return subprocess.Popen(
                [THALLUS, *args],
                env=self.cli_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )

        return start

    # the checks

    def observe(
        self,
        path: str,
        probes: Sequence[Probe],
        change: Change | None,
        since: Callable[[], float],
        *,
        through_a: bool = True,
        bound: float = BOUND + ALLOWANCE,
    ) -> None:
        """Make the change, then poll until every watcher answers the new way; then check the times.

        ``through_a``: the change is a request to A, so A's very next request must already be
        answered the new way, and B is polled. Otherwise (the CLI, an expiry) both are polled.
        ``since()``, read after the polling so that it delays no poll, is when the change was made;
        a request sent more than ``bound`` seconds after it and still answered the old way fails."""
        process = change() if change is not None else None
        next_request: list[tuple[Probe, float]] = []
        if through_a:
            assert process is None
            for probe in probes:
                answer = probe.ask(self.a)
                next_request.append((probe, time.monotonic()))
                assert answer == probe.new, f"{path}: A answered {answer} right after its own change ({probe.what})"
        watchers = [self.b] if through_a else [self.a, self.b]
        watches = [Watch(endpoint, probe) for endpoint in watchers for probe in probes]
        finished = None if process is not None else time.monotonic()
        pending = list(watches)
        while pending:
            for watch in list(pending):
                sent = time.monotonic()
                answer = watch.probe.ask(watch.endpoint)
                if answer == watch.probe.old:
                    watch.old_sent.append(sent)
                    continue
                received = time.monotonic()
                assert answer == watch.probe.new, (
                    f"{path}: {watch.endpoint.name} answered {answer} ({watch.probe.what}), expected {watch.probe.new}"
                )
                watch.changed = received
                pending.remove(watch)
            if process is not None and finished is None and process.poll() is not None:
                finished = time.monotonic()
            if finished is not None and time.monotonic() > finished + bound + 1.0:
                break  # reported below, with the times
            time.sleep(POLL)
        if process is not None:
            _, errors = process.communicate(timeout=60)
            assert process.returncode == 0, f"{path}: the CLI failed: {errors}"
        for watch in watches:  # and each stays so
            for _ in range(3):
                again = watch.probe.ask(watch.endpoint)
                assert again == watch.probe.new, f"{path}: {watch.endpoint.name} went back to {again}"
        moment = since()
        for watch in watches:
            late = [sent - moment for sent in watch.old_sent if sent - moment > bound]
            assert not late, (
                f"{self.setup} {path}: {watch.endpoint.name} still answered {watch.probe.old} ({watch.probe.what}) "
                f"to a request sent {max(late):.3f} s after the change (allowed: {bound} s)"
            )
            assert watch.changed is not None, f"{self.setup} {path}: {watch.endpoint.name} never changed"
        for probe, received in next_request:
            self.observations.append(
                Observation(self.setup, path, self.a.name, probe.what + " (next request)", received - moment, None, 1)
            )
        for watch in watches:
            assert watch.changed is not None
            last_old = max(watch.old_sent) - moment if watch.old_sent else None
            polls = len(watch.old_sent) + 1
            self.observations.append(
                Observation(
                    self.setup, path, watch.endpoint.name, watch.probe.what, watch.changed - moment, last_old, polls
                )
            )
        self.after_bound(path, probes, moment)

    def after_bound(self, path: str, probes: Sequence[Probe], since: float) -> None:
        """Past the bound, requests on fresh connections (to either instance or worker) are all refused."""
        time.sleep(max(0.0, since + BOUND + ALLOWANCE - time.monotonic()))
        for number in range(AFTER_BOUND_REQUESTS):
            fresh = self.fresh[number % len(self.fresh)]
            for probe in probes:
                answer = probe.ask(fresh)
                assert answer == probe.new, (
                    f"{path}: a fresh connection to {fresh.url} answered {answer} ({probe.what})"
                )


def monotonic_of(moment: datetime) -> float:
    """A wall-clock instant on the monotonic clock (the server writes wall-clock UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return time.monotonic() - (time.time() - moment.timestamp())


@dataclass(eq=False)
class Watch:
    """One probe polled on one instance: when it was still answered the old way, when it changed."""

    endpoint: Endpoint
    probe: Probe
    old_sent: list[float] = field(default_factory=list)
    changed: float | None = None


@dataclass
class Probe:
    """A request and how its answer reads (``ask``): ``old`` before the change, ``new`` after it."""

    what: str
    send: Callable[[Endpoint], httpx.Response]
    old: str
    new: str
    read: Callable[[httpx.Response], str] = lambda response: str(response.status_code)

    def ask(self, endpoint: Endpoint) -> str:
        return self.read(self.send(endpoint))


def me_probe(what: str, headers: dict[str, str], old: str = "200", new: str = "401") -> Probe:
    return Probe(what, lambda endpoint: endpoint.request("GET", "/api/v1/users/me", headers=headers), old, new)


def warm(cluster: Cluster, probes: Sequence[Probe], *endpoints: Endpoint) -> None:
    for endpoint in endpoints or (cluster.a, cluster.b):
        for probe in probes:
            answer = probe.ask(endpoint)
            assert answer == probe.old, f"warming {endpoint.name}: {probe.what} answered {answer}, not {probe.old}"


# -- the paths -----------------------------------------------------------------------------------


def through_a(cluster: Cluster, method: str, path: str, status: int, token: str, **kwargs: Any) -> Callable[[], None]:
    """A change made by a request to A with a Bearer token (and the same-origin headers CSRF wants)."""

    def change() -> None:
        response = cluster.a.request(method, path, headers={**bearer(token), **SAME_ORIGIN}, **kwargs)
        assert response.status_code == status, response.text

    return change


def logout(cluster: Cluster) -> None:
    login = cluster.login(cluster.user("logout"))
    probes = [me_probe("Bearer GET /users/me", bearer(login.token))]
    warm(cluster, probes)
    change = through_a(cluster, "POST", "/api/v1/auth/logout", 204, login.token)
    cluster.observe("logout", probes, change, lambda: cluster.change_time("session", login.session_id))


def password_change(cluster: Cluster) -> None:
    """Every session of the user ends: one signed in through A, one through B."""
    email = cluster.user("password")
    first, second = cluster.login(email, cluster.a), cluster.login(email, cluster.b)
    probes = [
        me_probe("Bearer (session 1) /users/me", bearer(first.token)),
        me_probe("Bearer (session 2) /users/me", bearer(second.token)),
    ]
    warm(cluster, probes)
    body = {"current_password": PASSWORD, "new_password": NEW_PASSWORD}
    change = through_a(cluster, "POST", "/api/v1/auth/password", 204, first.token, json=body)
    cluster.observe("password", probes, change, lambda: cluster.change_time("user", first.user_id))
    assert cluster.login(email, password=NEW_PASSWORD).token


def refresh_reuse(cluster: Cluster) -> None:
    """A rotated refresh cookie presented again revokes the whole family: both access tokens."""
    login = cluster.login(cluster.user("refresh"))

    def refresh(endpoint: Endpoint, cookie: str) -> httpx.Response:
        headers = {"Cookie": f"{REFRESH_COOKIE}={cookie}", **SAME_ORIGIN}
        return endpoint.request("POST", "/api/v1/auth/refresh", headers=headers)

    rotated = refresh(cluster.a, login.refresh)
    assert rotated.status_code == 200, rotated.text
    probes = [
        me_probe("Bearer (first token) /users/me", bearer(login.token)),
        me_probe("Bearer (rotated token) /users/me", bearer(rotated.json()["access_token"])),
    ]
    warm(cluster, probes)

    def reuse() -> None:
        reused = refresh(cluster.a, login.refresh)
        assert reused.status_code == 401, reused.text

    cluster.observe("refresh_reuse", probes, reuse, lambda: cluster.change_time("session", login.session_id))
    newest = refresh(cluster.b, refresh_cookie(rotated))
    assert newest.status_code == 401, "the newest refresh token of a revoked family must not work either"


def api_key_revocation(cluster: Cluster) -> None:
    login = cluster.login(cluster.user("key_revoke", api_access=True))
    key = cluster.new_key(login)
    probes = [me_probe("X-API-Key /users/me", api_key(key["key"]))]
    warm(cluster, probes)
    change = through_a(cluster, "DELETE", f"/api/v1/api-keys/{key['id']}", 204, login.token)
    cluster.observe("key_revoke", probes, change, lambda: cluster.change_time("api_key", key["id"]))


def key_expiry(cluster: Cluster) -> None:
    """No change at all: the expiry is a time in the record, checked on every request of both, so
    no request sent after ``expires_at`` may be accepted (no bound, no allowance)."""
    login = cluster.login(cluster.user("key_expiry", api_access=True))
    expires_at = datetime.now(UTC) + timedelta(seconds=3)
    key = cluster.new_key(login, expires_at=expires_at.isoformat())
    probes = [me_probe("X-API-Key /users/me", api_key(key["key"]))]
    warm(cluster, probes)
    moment = monotonic_of(expires_at)
    assert time.monotonic() < moment - 0.5, "the set-up took too long to see the key work before it expires"
    time.sleep(max(0.0, moment - 0.3 - time.monotonic()))  # poll from just before the expiry
    cluster.observe("key_expiry", probes, None, lambda: moment, through_a=False, bound=0.0)


def role_change(cluster: Cluster) -> None:
    """``thallus users set --role admin`` then ``--role user`` (the CLI: no instance made it)."""
    email = cluster.user("role")
    login = cluster.login(email)

    def audit_logs(endpoint: Endpoint) -> httpx.Response:
        return endpoint.request("GET", "/api/v1/audit-logs", params={"limit": 1}, headers=bearer(login.token))

    promoted = Probe("Bearer GET /audit-logs", audit_logs, "403", "200")
    demoted = Probe("Bearer GET /audit-logs", audit_logs, "200", "403")
    warm(cluster, [me_probe("Bearer /users/me", bearer(login.token)), promoted])
    since = lambda: cluster.change_time("user", login.user_id)  # noqa: E731
    admin = cluster.cli_change("users", "set", "--email", email, "--role", "admin")
    cluster.observe("role_admin", [promoted], admin, since, through_a=False)
    user = cluster.cli_change("users", "set", "--email", email, "--role", "user")
    cluster.observe("role_user", [demoted], user, since, through_a=False)


def feature_change(cluster: Cluster) -> None:
    """``--no-api-access``: creating a key is refused (403), and /users/me stops listing the feature."""
    email = cluster.user("feature", api_access=True)
    login = cluster.login(email)
    create = Probe(
        "Bearer POST /api-keys",
        lambda endpoint: endpoint.request(
            "POST", "/api/v1/api-keys", json={"name": "probe"}, headers={**bearer(login.token), **SAME_ORIGIN}
        ),
        "201",
        "403",
    )
    features = Probe(
        "Bearer /users/me features",
        lambda endpoint: endpoint.request("GET", "/api/v1/users/me", headers=bearer(login.token)),
        "api_access",
        "",
        read=lambda response: ",".join(response.json()["features"]) if response.status_code == 200 else "?",
    )
    warm(cluster, [create, features])
    change = cluster.cli_change("users", "set", "--email", email, "--no-api-access")
    since = lambda: cluster.change_time("user", login.user_id)  # noqa: E731
    cluster.observe("feature", [create, features], change, since, through_a=False)


def deactivation(cluster: Cluster) -> None:
    """``--no-active``: the user's Bearer token and API key are both refused (401)."""
    email = cluster.user("deactivate", api_access=True)
    login = cluster.login(email)
    key = cluster.new_key(login)
    probes = [me_probe("Bearer /users/me", bearer(login.token)), me_probe("X-API-Key /users/me", api_key(key["key"]))]
    warm(cluster, probes)
    change = cluster.cli_change("users", "set", "--email", email, "--no-active")
    since = lambda: cluster.change_time("user", login.user_id)  # noqa: E731
    cluster.observe("deactivate", probes, change, since, through_a=False)


PATHS: dict[str, Callable[[Cluster], None]] = {
    "logout": logout,
    "password_change": password_change,
    "refresh_reuse": refresh_reuse,
    "api_key_revocation": api_key_revocation,
    "key_expiry": key_expiry,
    "role_change": role_change,
    "feature_change": feature_change,
    "deactivation": deactivation,
}


# -- the set-ups -----------------------------------------------------------------------------------


@contextmanager
def postgres_instances() -> Iterator[Cluster]:
    """A and B: two ``thallus serve`` processes on one PostgreSQL database of this module's own."""
    database = create_postgres_database()
    url = database.render_as_string(hide_password=False)
    env = environment(database_url=url)
    try:
        with ExitStack() as stack:
            first = stack.enter_context(running_server(env))
            second = stack.enter_context(running_server(env))
            Log(first), Log(second)
            a, b = Endpoint("A", first.url), Endpoint("B", second.url)
            fresh = [Endpoint("fresh A", first.url, fresh=True), Endpoint("fresh B", second.url, fresh=True)]
            for endpoint in (a, b, *fresh):
                stack.callback(endpoint.close)
            yield Cluster("postgresql", a, b, fresh, env, url)
    finally:
        drop_postgres_database(database)


def pinned_pair(server: Server, stack: ExitStack) -> tuple[Endpoint, Endpoint]:
    """Two keep-alive connections to a ``--workers 2`` server, on different workers, pinned there
    (closed by ``stack``): connections are opened until one has reached each worker."""
    workers: dict[int, Endpoint] = {}
    deadline = time.monotonic() + 30  # the second worker may still be starting
    while len(workers) < 2:
        assert time.monotonic() < deadline, f"no connection reached a second worker within 30 s ({list(workers)})"
        endpoint = Endpoint("?", server.url)
        owner = endpoint.pin(server.process.pid, server.port)
        if owner is None or owner == server.process.pid or owner in workers:
            endpoint.close()
            time.sleep(0.05)
            continue
        workers[owner] = endpoint
        stack.callback(endpoint.close)
    (pid_a, a), (pid_b, b) = workers.items()
    a.name, b.name = f"A (w{pid_a})", f"B (w{pid_b})"
    return a, b


@contextmanager
def sqlite_workers(data_dir: Path) -> Iterator[Cluster]:
    """One ``thallus serve --workers 2`` on one SQLite file; A and B are connections pinned to each worker."""
    env = environment(data_dir=data_dir)
    with running_server(env, "--workers", "2") as server, ExitStack() as stack:
        Log(server)
        a, b = pinned_pair(server, stack)
        fresh = Endpoint("fresh", server.url, fresh=True)
        stack.callback(fresh.close)
        yield Cluster("sqlite", a, b, [fresh], env, f"sqlite+aiosqlite:///{data_dir / 'thallus.db'}")


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if request.param == "postgresql":
        manager = postgres_instances()
    else:
        manager = sqlite_workers(tmp_path_factory.mktemp("revocation-workers"))
    with manager as built:
        yield built
        print(f"\npropagation, {built.setup} (ms from the change's row, or expires_at, to the first refusal):")
        for observation in built.observations:
            print("  " + observation.line())


@pytest.mark.parametrize("path", list(PATHS))
def test_revocation_is_refused_at_once_here_and_within_the_bound_there(cluster: Cluster, path: str) -> None:
    start = len(cluster.observations)
    PATHS[path](cluster)
    for observation in cluster.observations[start:]:
        print(observation.line())


# -- a broken channel ------------------------------------------------------------------------------


def test_a_broken_channel_falls_back_to_the_database_and_never_accepts() -> None:
    """A and B reach PostgreSQL through proxies of their own; B's is cut, then a token is revoked
    through A. B may accept it while its view is still fresh (at most BOUND after its last read,
    which was before the cut); after that B's view is stale and every request is checked in the
    database, which B cannot reach: 503, never 200, for the revoked token and a valid one alike.
    Restored, B answers 401 for the revoked token and 200 for the valid one, and its log has one
    "identity view stale" line for the whole outage, not one per request."""
    database = create_postgres_database()
    try:
        host, port = database.host or "127.0.0.1", database.port or 5432
        with tcp_proxy(host, port) as to_a, tcp_proxy(host, port) as to_b:
            url_a = database.set(host="127.0.0.1", port=to_a.port).render_as_string(hide_password=False)
            url_b = database.set(host="127.0.0.1", port=to_b.port).render_as_string(hide_password=False)
            env_a = environment(database_url=url_a)
            with (
                running_server(env_a) as first,
                running_server(environment(database_url=url_b)) as second,
                ExitStack() as stack,
            ):
                log_a, log_b = Log(first), Log(second)
                a, b = Endpoint("A", first.url), Endpoint("B", second.url)
                stack.callback(a.close)
                stack.callback(b.close)
                cluster = Cluster("outage", a, b, [], env_a, url_a)
                email = cluster.user("outage")
                revoked, valid = cluster.login(email), cluster.login(email)
                revoked_probe = me_probe("revoked Bearer", bearer(revoked.token))
                valid_probe = me_probe("valid Bearer", bearer(valid.token))
                warm(cluster, [revoked_probe, valid_probe])

                to_b.cut()
                cut_at = time.monotonic()
                response = a.request("POST", "/api/v1/auth/logout", headers={**bearer(revoked.token), **SAME_ORIGIN})
                assert response.status_code == 204, response.text
                assert revoked_probe.ask(a) == "401", "A, still connected, refuses at once"

                seen: list[tuple[float, str]] = []
                while time.monotonic() < cut_at + BOUND + ALLOWANCE + 2.0:
                    sent = time.monotonic()
                    seen.append((sent - cut_at, revoked_probe.ask(b)))
                    time.sleep(POLL)
                assert {answer for _, answer in seen} <= {"200", "503"}, Counter(answer for _, answer in seen)
                late = [(offset, answer) for offset, answer in seen if offset > BOUND + ALLOWANCE]
                assert late and all(answer == "503" for _, answer in late), (
                    "past the bound B's view is stale: the fallback check must fail closed (503), never accept: "
                    f"{Counter(answer for _, answer in late)}"
                )
                assert valid_probe.ask(b) == "503", "a valid credential too: the database decides, and is down"
                last_accepted = max((offset for offset, answer in seen if answer == "200"), default=None)
                first_503 = min(offset for offset, answer in seen if answer == "503")

                to_b.restore()
                restored_at = time.monotonic()
                while (answer := revoked_probe.ask(b)) == "503":
                    assert time.monotonic() < restored_at + 15, "B did not recover within 15 s of the restore"
                    time.sleep(POLL)
                recovered_after = time.monotonic() - restored_at
                assert answer == "401", f"B answered {answer} for the revoked token after the restore"
                assert revoked_probe.ask(b) == "401"
                assert valid_probe.ask(b) == "200"
                assert valid_probe.ask(a) == "200"
                time.sleep(0.6)  # the view's next reads: B logs that it is current again
                stale = log_b.messages("identity view stale")
                current = log_b.messages("identity view current again")
                unavailable = log_b.messages("database unavailable")
                listen = log_b.messages("no LISTEN connection")
                print(
                    f"\nbroken channel: B accepted the revoked token until {last_accepted or 0:.3f} s after the cut "
                    f"({'last 200' if last_accepted is not None else 'no 200 at all'}), answered 503 from "
                    f"{first_503:.3f} s ({len(seen)} polls over {seen[-1][0]:.1f} s: {dict(Counter(a for _, a in seen))}); "
                    f"401 again {recovered_after:.3f} s after the restore.\n"
                    f"B's log: {len(stale)} 'identity view stale', {len(current)} 'identity view current again', "
                    f"{len(unavailable)} 'database unavailable', {len(listen)} 'no LISTEN connection' lines"
                )
                assert len(stale) == 1, f"one 'identity view stale' line for the outage, not {len(stale)}: {stale}"
                assert len(current) == 1, current
                assert not log_a.messages("identity view stale"), "A never lost its database"
    finally:
        drop_postgres_database(database)
