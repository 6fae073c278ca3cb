"""Black-box attacks on signing in, against real ``thallus serve`` processes over loopback HTTP.

The issue names seven attacks on the sign-in path (docs/design.md §9 identity, §10 rate limiting and
lockout). Each test mounts one against a production-configured server and asserts the behaviour
that defeats it:

1. **Lockout bypass by spelling** — other spellings of a locked address (case, blanks, full-width
   NFKC forms) reach the account, so each must meet the same lock (one canonical form, §9).
2. **Racing past the threshold** — guesses fired at once all pass the "is it locked?" check before any
   failure is counted; at most the threshold's number of passwords may ever be verified (§10).
3. **Unbounded hashing** — a flood of logins runs one Argon2 computation (64 MiB each) per request;
   hashing must be capped per process, a request that cannot get a slot soon answers a JSON 503, and
   API-key traffic keeps being served.
4. **A key mints a key** — an API key must not create, list or revoke keys, nor change the password (§9).
5. **IPv6 rotation** — a client owns a whole /64; the limit counts per /64 (IPv4 per address, an
   IPv4-mapped IPv6 address as its IPv4 address), while the audit log keeps the full address (§10).
6. **Forwarding headers** — behind a proxy that sets one forwarding header, a client can send the
   other one itself; only ``THALLUS_PROXY_HEADER``'s header names the client (§10).
7. **Password in the username field** — a password typed as the identifier must never land verbatim in
   the audit log: records carry ``identifier_valid`` and a hash instead (§9, §11).

Plus hardening: the refresh cookie is ``__Secure-thallus_refresh`` outside development, and the data
directory, the SQLite database, the secret key and the audit journal are private to their owner even
when the process starts under a permissive umask.

All traffic goes to 127.0.0.1; ``THALLUS_TRUSTED_PROXIES=127.0.0.1`` lets a forwarding header name
each simulated client. Audit records are written asynchronously, so they are polled for with a
deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import ssl
import stat
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import coredis
import httpx
import pytest
from sqlalchemy.engine import URL

from tests.conftest import RedisTarget
from tests.server import THALLUS, Server, free_port, running_server, stop_process

PUBLIC_ORIGIN = "https://api.example.com"
SECRET_KEY = "signin-attacks-" + "0123456789abcdef" * 2 + "x"  # 48 characters
PASSWORD = "Correct-Horse-Battery-9!"
NEW_PASSWORD = "Another-Horse-Battery-8?"
WRONG = "Wrong-Password-123!"
ADMIN_EMAIL = "root@example.com"
ADMIN_IP = "192.0.2.250"
#: What a browser on the service's own page sends with a login (docs/design.md §5, login CSRF).
SAME_ORIGIN = {"Origin": PUBLIC_ORIGIN, "Sec-Fetch-Site": "same-origin"}
CHEAP_ARGON2 = {
    "THALLUS_ARGON2_TIME_COST": "1",
    "THALLUS_ARGON2_MEMORY_COST": "19456",
    "THALLUS_ARGON2_PARALLELISM": "1",
}
LOGIN = "/api/v1/auth/login"
REGISTER = "/api/v1/auth/register"
REFRESH = "/api/v1/auth/refresh"
PASSWORD_CHANGE = "/api/v1/auth/password"
KEYS = "/api/v1/api-keys"
ME = "/api/v1/users/me"
AUDIT = "/api/v1/audit-logs"
AUDIT_EXPORT = "/api/v1/audit-logs/export"
ERROR_FIELDS = {"error", "message", "details", "correlation_id"}
AUDIT_DEADLINE = 10.0
MIB = 1024 * 1024

#: One TLS context for every client: httpx builds one per client otherwise (~40 ms each), which would
#: dominate a burst of 150 clients (the traffic itself is plain http on loopback).
TLS = ssl.create_default_context()

Json = dict[str, Any]


# -- configurations ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Stack:
    """Where the server keeps its data (``sqlite``/``postgresql``) and its limits (``memory``/``redis``)."""

    database: str
    limits: str

    def __str__(self) -> str:
        return f"{self.database}+{self.limits}"


SQLITE_MEMORY = Stack("sqlite", "memory")
SQLITE_REDIS = Stack("sqlite", "redis")
POSTGRES_REDIS = Stack("postgresql", "redis")


def stacks(*chosen: Stack) -> pytest.MarkDecorator:
    """Run a test once on each of ``chosen`` (through the ``environment`` fixture)."""
    return pytest.mark.parametrize("environment", chosen, indirect=True, ids=str)


@pytest.fixture
def environment(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """A production configuration on the test's :class:`Stack` (SQLite + memory unless parametrized)."""
    stack: Stack = getattr(request, "param", SQLITE_MEMORY)
    env = {
        "THALLUS_ENV": "production",
        "THALLUS_SECRET_KEY": SECRET_KEY,
        "THALLUS_PUBLIC_ORIGIN": PUBLIC_ORIGIN,
        "THALLUS_ALLOWED_ORIGINS": "https://app.example.com",
        "THALLUS_TRUSTED_PROXIES": "127.0.0.1",
        "THALLUS_RATE_LIMIT": "6000/minute",  # the general limit is never the point here; polling stays under it
        "THALLUS_DATA_DIR": str(tmp_path / "data"),
        **CHEAP_ARGON2,
    }
    if stack.database == "sqlite":
        env["THALLUS_DATABASE_URL"] = f"sqlite+aiosqlite:///{tmp_path / 't.db'}"
    else:
        postgres: URL = request.getfixturevalue("empty_postgres")
        env["THALLUS_DATABASE_URL"] = postgres.render_as_string(hide_password=False)
    if stack.limits == "redis":
        target: RedisTarget = request.getfixturevalue("redis_target")
        env["THALLUS_REDIS_URL"] = target.url
        env["THALLUS_REDIS_KEY_PREFIX"] = target.prefix
    return env


def production_argon2(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without the cheap Argon2 cost: the production defaults (t=3, 64 MiB, p=4)."""
    return {name: value for name, value in env.items() if not name.startswith("THALLUS_ARGON2_")}


# -- processes ----------------------------------------------------------------------------------


@dataclass
class Running:
    """A started server whose output is drained as it comes (a full pipe would stall its logging)."""

    server: Server
    log: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def pid(self) -> int:
        return self.server.process.pid

    def tail(self, lines: int = 30) -> str:
        return "".join(self.log[-lines:])


def _draining(server: Server) -> Running:
    server.start_reading()  # running_server has; a server started here has not
    return Running(server, server.lines)


@contextmanager
def serve(env: Mapping[str, str]) -> Iterator[Running]:
    with running_server(env) as server:
        yield _draining(server)


def _process_environment(env: Mapping[str, str]) -> dict[str, str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("THALLUS_") or k.startswith("THALLUS_TEST_")}
    full.update(env)
    return full


def _under_umask(command: Sequence[str], umask: int | None) -> list[str]:
    if umask is None:
        return list(command)
    return ["/bin/sh", "-c", f'umask {umask:03o} && exec "$0" "$@"', *command]


@contextmanager
def serve_under_umask(env: Mapping[str, str], umask: int) -> Iterator[Running]:
    """``thallus serve`` started by a shell that first sets ``umask`` (``running_server`` cannot)."""
    port = free_port()
    command = [THALLUS, "serve", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(
        _under_umask(command, umask),
        env=_process_environment(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    running = _draining(Server(f"http://127.0.0.1:{port}", port, process))
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, f"thallus serve exited with {process.returncode}: {running.tail()}"
            try:
                request("GET", running.url + "/health", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, f"thallus serve did not answer: {running.tail()}"
                time.sleep(0.1)
        yield running
    finally:
        stop_process(process, 10)


def thallus(
    env: Mapping[str, str], *args: str, stdin: str | None = None, umask: int | None = None
) -> subprocess.CompletedProcess[str]:
    """The ``thallus`` CLI with ``env`` (and nothing of the shell's own ``THALLUS_*``)."""
    return subprocess.run(
        _under_umask([THALLUS, *args], umask),
        env=_process_environment(env),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def create_user(
    env: Mapping[str, str], email: str, *, admin: bool = False, api_access: bool = False, umask: int | None = None
) -> str:
    """``thallus users create`` (password on stdin); the new user's id."""
    args = ["users", "create", "--email", email, "--password", "-"]
    if admin:
        args.append("--admin")
    if api_access:
        args.append("--api-access")
    result = thallus(env, *args, stdin=PASSWORD + "\n", umask=umask)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()[0]


def create_key(env: Mapping[str, str], email: str, name: str) -> str:
    """``thallus keys create``: the raw key (stdout is the key alone)."""
    result = thallus(env, "keys", "create", "--email", email, "--name", name)
    assert result.returncode == 0, result.stderr
    raw = result.stdout.strip()
    assert raw.startswith("thal_"), result.stdout
    return raw


# -- HTTP -----------------------------------------------------------------------------------------


def client(timeout: float = 30.0) -> httpx.Client:
    return httpx.Client(verify=TLS, timeout=timeout)


def request(
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    json: Mapping[str, Any] | None = None,
    params: Mapping[str, str | int] | None = None,
    timeout: float = 30.0,
) -> httpx.Response:
    with client(timeout) as http:
        return http.request(method, url, headers=headers, json=json, params=params)


def xff(ip: str) -> dict[str, str]:
    """The client ``ip`` as the trusted proxy (127.0.0.1) names it by default."""
    return {"X-Forwarded-For": ip}


def new_correlation_id(label: str) -> str:
    """A correlation ID of one request's own, to find exactly its audit records."""
    return f"{label}-{uuid.uuid4().hex[:16]}"


def login(
    url: str,
    email: str,
    password: str,
    *,
    via: Mapping[str, str],
    correlation_id: str | None = None,
    timeout: float = 30.0,
) -> httpx.Response:
    """A browser-like JSON login from the client that the forwarding headers ``via`` name."""
    headers = {**SAME_ORIGIN, **via}
    if correlation_id is not None:
        headers["X-Correlation-ID"] = correlation_id
    return request("POST", url + LOGIN, headers=headers, json={"email": email, "password": password}, timeout=timeout)


def register(url: str, email: str, *, via: Mapping[str, str]) -> None:
    response = request(
        "POST", url + REGISTER, headers={**SAME_ORIGIN, **via}, json={"email": email, "password": PASSWORD}
    )
    assert response.status_code == 201, response.text


def assert_error(response: httpx.Response, status: int, error: str) -> Json:
    """``response`` is the §8 JSON error ``error`` with ``status``; its body."""
    assert response.status_code == status, f"expected {status} {error}, got {response.status_code}: {response.text}"
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body: Json = response.json()
    assert set(body) == ERROR_FIELDS, body
    assert body["error"] == error, body
    assert body["correlation_id"] == response.headers["x-correlation-id"], body
    return body


def assert_retry_after(response: httpx.Response) -> int:
    value = response.headers.get("retry-after", "")
    assert value.isdigit() and int(value) > 0, f"Retry-After {value!r} on {response.status_code}: {response.text}"
    return int(value)


def assert_rate_limited(response: httpx.Response) -> None:
    assert_error(response, 429, "RateLimitError")
    assert_retry_after(response)


def assert_unavailable(response: httpx.Response) -> None:
    assert_error(response, 503, "ServiceUnavailableError")
    assert_retry_after(response)


@dataclass(frozen=True)
class Admin:
    """A signed-in admin reading the audit log (from a client address of its own)."""

    url: str
    headers: Mapping[str, str]

    @classmethod
    def sign_in(cls, url: str, via: Mapping[str, str] | None = None) -> Admin:
        via = via if via is not None else xff(ADMIN_IP)
        response = login(url, ADMIN_EMAIL, PASSWORD, via=via)
        assert response.status_code == 200, response.text
        return cls(url, {"Authorization": f"Bearer {response.json()['access_token']}", **via})

    def get(self, path: str, **params: str | int) -> httpx.Response:
        response = request("GET", self.url + path, headers=self.headers, params=params)
        assert response.status_code == 200, response.text
        return response

    def records(self, **params: str | int) -> list[Json]:
        items: list[Json] = self.get(AUDIT, limit=1000, **params).json()["items"]
        return items

    def wait_for(
        self, ready: Callable[[list[Json]], bool], *, timeout: float = AUDIT_DEADLINE, **params: str | int
    ) -> list[Json]:
        """The records matching ``params`` once ``ready`` holds for them, or when ``timeout`` has passed."""
        deadline = time.monotonic() + timeout
        while True:
            items = self.records(**params)
            if ready(items) or time.monotonic() >= deadline:
                return items
            time.sleep(0.2)

    def records_of(self, correlation_ids: Collection[str], *, action: str) -> dict[str, Json]:
        """The ``action`` record of each request in ``correlation_ids``, by correlation ID."""
        wanted = set(correlation_ids)
        items = self.wait_for(lambda found: wanted <= {item["correlation_id"] for item in found}, action=action)
        found = {item["correlation_id"]: item for item in items if item["correlation_id"] in wanted}
        missing = wanted - set(found)
        assert not missing, f"no {action} record within {AUDIT_DEADLINE} s for {sorted(missing)}"
        return found


# -- firing requests at once ------------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """One POST of a burst: its full URL, headers and JSON body."""

    url: str
    headers: Mapping[str, str]
    body: Mapping[str, str]


def _health_url(url: str) -> str:
    return str(httpx.URL(url).copy_with(path="/health", query=None))


def fire_together(
    attempts: Sequence[Attempt], *, barrier: threading.Barrier | None = None, timeout: float = 60.0
) -> list[httpx.Response]:
    """Send every attempt at the same moment, each on a connection of its own, opened beforehand.

    Each thread opens its connection (``GET /health``, exempt from limits), waits at the barrier,
    then sends its POST; so the requests leave together rather than as fast as connections open.
    A caller may pass a barrier with more parties, to start companions at the same moment.
    """
    start = barrier if barrier is not None else threading.Barrier(len(attempts))

    def send(attempt: Attempt) -> httpx.Response:
        with client(timeout) as http:
            try:
                http.get(_health_url(attempt.url))
            except BaseException:
                start.abort()
                raise
            start.wait(timeout=60)
            return http.post(attempt.url, headers=attempt.headers, json=attempt.body)

    with ThreadPoolExecutor(max_workers=len(attempts)) as pool:
        return list(pool.map(send, attempts))


def statuses(responses: Sequence[httpx.Response]) -> Counter[int]:
    return Counter(response.status_code for response in responses)


# -- 1. lockout bypass by spelling ------------------------------------------------------------------

#: Spellings of hank@example.com (blanks, case, full-width domain letters, the full-width local part
#: whose NFKC form is "hank"). ``hank@xn--exmple-cua.com`` would be another domain: not one of them.
HANK_SPELLINGS = (
    " hank@ｅｘａｍｐｌｅ.com",
    "HANK@EXAMPLE.COM",
    "hank@example.com ",
    "\thank@Example.Com",
    "ｈａｎｋ@example.com",
)
IRIS_SPELLINGS = (
    " Iris@EXAMPLE.com",
    "iris@ｅｘａｍｐｌｅ.com",
    "IRIS@example.com ",
    "\tiris@Example.Com",
    "ｉｒｉｓ@example.com",
)


@stacks(SQLITE_MEMORY, POSTGRES_REDIS)
def test_lockout_holds_for_every_spelling_of_the_address(environment: dict[str, str]) -> None:
    """Attack 1: after the lock, retry the right password under another spelling of the address.
    Rule: one canonical form is the lockout key, so every spelling meets the lock (429 + Retry-After),
    and failures under different spellings add up to one lock."""
    env = {**environment, "THALLUS_LOCKOUT_THRESHOLD": "5", "THALLUS_RATE_LIMIT_AUTH": "1000/minute"}
    with serve(env) as server:
        register(server.url, "hank@example.com", via=xff("198.51.100.201"))
        register(server.url, "iris@example.com", via=xff("198.51.100.202"))

        failures = [login(server.url, "hank@example.com", WRONG, via=xff("198.51.100.1")) for _ in range(5)]
        assert [r.status_code for r in failures] == [401] * 5
        retries = {
            spelling: login(server.url, spelling, PASSWORD, via=xff("198.51.100.2")) for spelling in HANK_SPELLINGS
        }
        assert {s: r.status_code for s, r in retries.items()} == dict.fromkeys(HANK_SPELLINGS, 429)
        for response in retries.values():
            assert_rate_limited(response)

        spread = [login(server.url, spelling, WRONG, via=xff("198.51.100.3")) for spelling in IRIS_SPELLINGS]
        assert [r.status_code for r in spread] == [401] * 5, "each failure is verified and counted"
        locked = login(server.url, "iris@example.com", PASSWORD, via=xff("198.51.100.4"))
        assert locked.status_code == 429, f"five failures under five spellings must lock iris: {locked.text}"
        assert_rate_limited(locked)


# -- 2. racing past the threshold -------------------------------------------------------------------

RACE_SIZE = 30
RACE_ROUNDS = 3
THRESHOLD = 5


def race(urls: Sequence[str]) -> None:
    """Three rounds, each on a fresh account: 30 logins at once, each from an address of its own,
    alternating over ``urls``. Round 0 guesses wrong 30 times; rounds 1 and 2 hold the right password
    once among 29 wrong ones.

    A password was verified when the answer is 401 or 200. Without a success, at most the threshold's
    number are verified, and afterwards the account is locked even for the right password. A success
    resets the count (docs/design.md §10), so when the right password got in, the bound holds on each side of
    it: at most 2 × threshold − 1 failures. Every other answer is the lock's 429, never a 5xx.
    """
    for round_ in range(RACE_ROUNDS):
        email = f"race{round_}@example.com"
        register(urls[0], email, via=xff(f"203.0.113.{round_ + 1}"))
        right_at = None if round_ == 0 else RACE_SIZE // 2
        attempts = [
            Attempt(
                urls[i % len(urls)] + LOGIN,
                {**SAME_ORIGIN, **xff(f"198.51.100.{round_ * RACE_SIZE + i + 1}")},
                {"email": email, "password": PASSWORD if i == right_at else WRONG},
            )
            for i in range(RACE_SIZE)
        ]
        responses = fire_together(attempts)
        seen = statuses(responses)
        assert set(seen) <= {200, 401, 429}, f"round {round_}: {seen}"
        for response in responses:
            if response.status_code == 429:
                assert_rate_limited(response)
        if seen[200] == 0:
            assert 1 <= seen[401] <= THRESHOLD, f"round {round_}: {seen[401]} passwords verified (threshold 5): {seen}"
            after = login(urls[-1], email, PASSWORD, via=xff(f"203.0.113.{101 + round_}"))
            assert after.status_code == 429, f"round {round_}: the lock must hold the right password: {after.text}"
            assert_rate_limited(after)
        else:
            failures = seen[401]
            assert failures <= 2 * THRESHOLD - 1, f"round {round_}: {failures} wrong passwords verified: {seen}"


@stacks(SQLITE_MEMORY, POSTGRES_REDIS)
def test_concurrent_guesses_cannot_outrun_the_lockout(environment: dict[str, str]) -> None:
    """Attack 2: 30 simultaneous guesses for one account from 30 addresses, so that all of them pass
    the lock check before any failure is counted. Rule: at most 5 passwords are verified between a start
    (or a success) and the lock; the rest answer 429, and the lock then holds the right password too."""
    env = {**environment, "THALLUS_LOCKOUT_THRESHOLD": str(THRESHOLD)}
    with serve(env) as server:
        race([server.url])


@stacks(POSTGRES_REDIS)
def test_concurrent_guesses_across_two_instances_cannot_outrun_the_lockout(environment: dict[str, str]) -> None:
    """Attack 2 across a load balancer: the 30 guesses alternate between two instances sharing
    PostgreSQL and Redis. Rule: the same bound holds in total over both instances."""
    env = {**environment, "THALLUS_LOCKOUT_THRESHOLD": str(THRESHOLD)}
    with serve(env) as first, serve(env) as second:
        race([first.url, second.url])


# -- 3. unbounded hashing ---------------------------------------------------------------------------

FLOOD_SIZE = 150
ARGON2_DEFAULT_MIB = 64


def memory_kib(pid: int, field_name: str) -> int:
    """``VmRSS`` / ``VmHWM`` of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field_name:
            return int(value.split()[0])
    raise AssertionError(f"no {field_name} in /proc/{pid}/status")


def hashing_budget_mib() -> int:
    """What a login flood may add to the server's memory: 400 MiB on this 2-CPU machine — the default
    cap (2 hashing slots per CPU) × 64 MiB, plus headroom. An unbounded server runs a hash in each of its
    40 worker threads at once (measured before the fix: +1.8 GiB)."""
    cpus = max(os.cpu_count() or 1, len(os.sched_getaffinity(0)))
    return max(400, 2 * cpus * ARGON2_DEFAULT_MIB + 144)


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def test_a_login_flood_cannot_exhaust_memory_or_starve_api_keys(environment: dict[str, str]) -> None:
    """Attack 3: 150 concurrent logins for 150 addresses at the production Argon2 cost (64 MiB each),
    while an API client keeps working. Rule: hashing is capped per process — memory grows by less than
    the budget, the logins answer 401/429 or a JSON 503 with Retry-After (never another 5xx), and every
    API-key request is answered 200."""
    env = production_argon2(environment)
    create_user(env, "api@example.com", api_access=True)
    key = create_key(env, "api@example.com", "k")
    with serve(env) as server:
        warm_up = [
            login(server.url, "api@example.com", password, via=xff(f"198.18.200.{n}"))
            for n, password in enumerate((PASSWORD, WRONG, PASSWORD), start=1)
        ]
        assert [r.status_code for r in warm_up] == [200, 401, 200]
        before_kib = memory_kib(server.pid, "VmRSS")

        attempts = [
            Attempt(
                server.url + LOGIN,
                {**SAME_ORIGIN, **xff(f"198.18.{i // 250}.{i % 250 + 1}")},
                {"email": "api@example.com" if i % 10 == 0 else f"flood{i}@example.com", "password": WRONG},
            )
            for i in range(FLOOD_SIZE)
        ]
        barrier = threading.Barrier(len(attempts) + 1)
        flood_over = threading.Event()
        latencies: list[float] = []
        api_answers: list[str] = []

        def use_the_api() -> None:
            with client(timeout=30) as http:
                http.get(server.url + "/health")
                barrier.wait(timeout=60)
                for _ in range(20_000):  # bounded; ends with the flood
                    started = time.perf_counter()
                    try:
                        answer = http.get(server.url + ME, headers={"X-API-Key": key, **xff("192.0.2.77")})
                        api_answers.append(str(answer.status_code))
                    except httpx.HTTPError as exc:
                        api_answers.append(repr(exc))
                    latencies.append(time.perf_counter() - started)
                    if flood_over.is_set():
                        break

        companion = threading.Thread(target=use_the_api)
        companion.start()
        try:
            responses = fire_together(attempts, barrier=barrier, timeout=180)
        finally:
            flood_over.set()
            companion.join(timeout=60)
        assert not companion.is_alive(), "the API client is still waiting for an answer"
        peak_kib = memory_kib(server.pid, "VmHWM")
        assert server.server.process.poll() is None, f"the server died: {server.tail()}"

    seen = statuses(responses)
    assert set(seen) <= {401, 429, 503}, f"{seen}\n{server.tail()}"
    for response in responses:
        if response.status_code == 503:
            assert_unavailable(response)
    growth_mib = (peak_kib - before_kib) / 1024
    budget = hashing_budget_mib()
    p99 = percentile(latencies, 0.99) if latencies else math.nan
    print(f"login flood {dict(seen)}; memory +{growth_mib:.0f} MiB (budget {budget}); API p99 {p99 * 1000:.0f} ms")
    assert growth_mib < budget, f"the flood grew the server by {growth_mib:.0f} MiB (budget {budget} MiB)"
    assert api_answers, "the API client sent nothing during the flood"
    assert Counter(api_answers) == {"200": len(api_answers)}, Counter(api_answers)


@stacks(SQLITE_MEMORY, POSTGRES_REDIS)
def test_a_request_that_cannot_get_a_hashing_slot_answers_503(environment: dict[str, str]) -> None:
    """Attack 3, the refusal: one hashing slot, 0.2 s of waiting for it, 20 logins at once at the
    production cost. Rule: the ones that get no slot answer the §8 JSON 503 with Retry-After — never a 500."""
    env = {
        **production_argon2(environment),
        "THALLUS_PASSWORD_HASH_CONCURRENCY": "1",
        "THALLUS_PASSWORD_HASH_MAX_WAIT": "0.2",
    }
    with serve(env) as server:
        attempts = [
            Attempt(
                server.url + LOGIN,
                {**SAME_ORIGIN, **xff(f"198.18.100.{i + 1}")},
                {"email": f"queue{i}@example.com", "password": WRONG},
            )
            for i in range(20)
        ]
        responses = fire_together(attempts)
    seen = statuses(responses)
    assert set(seen) <= {401, 429, 503}, f"{seen}\n{server.tail()}"
    assert seen[503] >= 1, f"20 logins for one 0.2 s hashing slot, and no 503: {seen}"
    for response in responses:
        if response.status_code == 503:
            assert_unavailable(response)


# -- 4. a key mints a key ---------------------------------------------------------------------------


@stacks(SQLITE_MEMORY, POSTGRES_REDIS)
def test_an_api_key_cannot_manage_keys_or_the_password(environment: dict[str, str]) -> None:
    """Attack 4: a leaked API key is used to mint a fresh key (persistence), list the keys, revoke the
    owner's other keys, or change the password. Rule: each is 403 PermissionDeniedError, audited as
    ``permission_denied``; the same calls with a session succeed; the key still works on normal routes."""
    env = environment
    create_user(env, ADMIN_EMAIL, admin=True)
    kim_id = create_user(env, "kim@example.com", api_access=True)
    with serve(env) as server:
        kim = xff("198.51.100.40")
        signed_in = login(server.url, "kim@example.com", PASSWORD, via=kim)
        assert signed_in.status_code == 200, signed_in.text
        bearer = {"Authorization": f"Bearer {signed_in.json()['access_token']}", **kim}
        expires_at = (datetime.now(UTC) + timedelta(minutes=10)).isoformat()
        first = request("POST", server.url + KEYS, headers=bearer, json={"name": "k1", "expires_at": expires_at})
        assert first.status_code == 201, first.text
        other = request("POST", server.url + KEYS, headers=bearer, json={"name": "k2"})
        assert other.status_code == 201, other.text
        k1, k2, k2_id = first.json()["key"], other.json()["key"], other.json()["id"]

        ids = {name: new_correlation_id(f"key-{name}") for name in ("create", "list", "revoke", "password")}

        def as_k1(name: str) -> dict[str, str]:
            return {"X-API-Key": k1, "X-Correlation-ID": ids[name], **kim}

        denied = {
            "create": request("POST", server.url + KEYS, headers=as_k1("create"), json={"name": "k3"}),
            "list": request("GET", server.url + KEYS, headers=as_k1("list")),
            "revoke": request("DELETE", f"{server.url}{KEYS}/{k2_id}", headers=as_k1("revoke")),
            "password": request(
                "POST",
                server.url + PASSWORD_CHANGE,
                headers=as_k1("password"),
                json={"current_password": PASSWORD, "new_password": NEW_PASSWORD},
            ),
        }
        assert {name: r.status_code for name, r in denied.items()} == dict.fromkeys(denied, 403)
        for response in denied.values():
            assert_error(response, 403, "PermissionDeniedError")
        for raw in (k1, k2):  # keys still work for normal routes, and k2 was not revoked
            me = request("GET", server.url + ME, headers={"X-API-Key": raw, **kim})
            assert me.status_code == 200, me.text
            assert me.json()["email"] == "kim@example.com"

        records = Admin.sign_in(server.url).records_of(ids.values(), action="permission_denied")
        for record in records.values():
            assert (record["user_id"], record["outcome"]) == (kim_id, "denied"), record

        # controls: the same calls with the session
        created = request("POST", server.url + KEYS, headers=bearer, json={"name": "k3"})
        assert created.status_code == 201, created.text
        listed = request("GET", server.url + KEYS, headers=bearer)
        assert listed.status_code == 200, listed.text
        assert {first.json()["id"], k2_id, created.json()["id"]} <= {key["id"] for key in listed.json()}
        revoked = request("DELETE", f"{server.url}{KEYS}/{k2_id}", headers=bearer)
        assert revoked.status_code == 204, revoked.text
        assert request("GET", server.url + ME, headers={"X-API-Key": k2, **kim}).status_code == 401
        changed = request(
            "POST",
            server.url + PASSWORD_CHANGE,
            headers=bearer,
            json={"current_password": PASSWORD, "new_password": NEW_PASSWORD},
        )
        assert changed.status_code == 204, changed.text


# -- 5. IPv6 rotation -------------------------------------------------------------------------------


@stacks(SQLITE_MEMORY, SQLITE_REDIS)
def test_ipv6_addresses_of_one_64_share_the_limit(environment: dict[str, str]) -> None:
    """Attack 5: a client rotates through addresses of its own /64 (2^64 of them) to escape the auth
    limit. Rule: IPv6 counts per /64, an IPv4-mapped address as its IPv4 address; the audit log keeps
    each full address."""
    env = {**environment, "THALLUS_RATE_LIMIT_AUTH": "5/minute"}
    create_user(env, ADMIN_EMAIL, admin=True)
    with serve(env) as server:
        rotated = [login(server.url, f"v6-{i}@example.com", WRONG, via=xff(f"2001:db8:1:2::{i}")) for i in range(1, 9)]
        assert [r.status_code for r in rotated] == [401] * 5 + [429] * 3
        for response in rotated[5:]:
            assert_rate_limited(response)
        neighbour = login(server.url, "v6-next@example.com", WRONG, via=xff("2001:db8:1:3::1"))
        assert neighbour.status_code == 401, f"another /64 is another client: {neighbour.text}"

        spellings = ("::ffff:198.51.100.7", "198.51.100.7")
        mapped = [login(server.url, f"v4-{i}@example.com", WRONG, via=xff(spellings[i % 2])) for i in range(7)]
        assert [r.status_code for r in mapped] == [401] * 5 + [429] * 2, "::ffff:198.51.100.7 is 198.51.100.7"

        full = {f"2001:db8:1:2::{i}" for i in range(1, 6)}
        records = Admin.sign_in(server.url).wait_for(
            lambda items: full <= {item["ip_address"] for item in items}, action="login_failed"
        )
        addresses = {record["ip_address"] for record in records}
        assert full <= addresses, f"the audit log must keep each full address: {sorted(map(str, addresses))}"


def test_ipv6_prefix_128_makes_every_address_a_client(environment: dict[str, str]) -> None:
    """Control for attack 5: with ``THALLUS_RATE_LIMIT_IPV6_PREFIX=128`` each address is its own bucket."""
    env = {**environment, "THALLUS_RATE_LIMIT_AUTH": "5/minute", "THALLUS_RATE_LIMIT_IPV6_PREFIX": "128"}
    with serve(env) as server:
        answers = [login(server.url, f"v6-{i}@example.com", WRONG, via=xff(f"2001:db8:1:2::{i}")) for i in range(1, 9)]
        assert [r.status_code for r in answers] == [401] * 8


# -- 6. forwarding headers --------------------------------------------------------------------------


def test_only_the_configured_forwarding_header_names_the_client(environment: dict[str, str]) -> None:
    """Attack 6: behind a proxy that sets one forwarding header, the client sends the other one itself,
    a new address each time. Rule: only ``THALLUS_PROXY_HEADER``'s header (default X-Forwarded-For,
    or ``forwarded`` for RFC 7239) names the client, for the limit and for the audit log."""
    create_user(environment, ADMIN_EMAIL, admin=True)

    # the proxy sets Forwarded; the client adds an X-Forwarded-For of its choosing
    env = {**environment, "THALLUS_RATE_LIMIT_AUTH": "5/minute", "THALLUS_PROXY_HEADER": "forwarded"}
    with serve(env) as server:
        ids = [new_correlation_id("forwarded") for _ in range(6)]
        answers = [
            login(
                server.url,
                f"fwd-{i}@example.com",
                WRONG,
                via={"Forwarded": "for=198.51.100.9", "X-Forwarded-For": f"203.0.113.{i + 1}"},
                correlation_id=ids[i],
            )
            for i in range(6)
        ]
        assert [r.status_code for r in answers] == [401] * 5 + [429], "X-Forwarded-For is not the proxy's"
        assert_rate_limited(answers[5])
        bracketed_id = new_correlation_id("forwarded-v6")
        bracketed = login(
            server.url,
            "fwd-v6@example.com",
            WRONG,
            via={"Forwarded": 'for="[2001:db8::1]:4711"'},
            correlation_id=bracketed_id,
        )
        assert bracketed.status_code == 401, bracketed.text
        admin = Admin.sign_in(server.url, via={"Forwarded": f"for={ADMIN_IP}"})
        records = admin.records_of([*ids[:5], bracketed_id], action="login_failed")
        assert {records[i]["ip_address"] for i in ids[:5]} == {"198.51.100.9"}
        assert records[bracketed_id]["ip_address"] == "2001:db8::1"

    # the default: the proxy sets X-Forwarded-For; the client adds a Forwarded of its choosing
    env = {**environment, "THALLUS_RATE_LIMIT_AUTH": "5/minute"}
    with serve(env) as server:
        ids = [new_correlation_id("x-forwarded-for") for _ in range(6)]
        answers = [
            login(
                server.url,
                f"xff-{i}@example.com",
                WRONG,
                via={"X-Forwarded-For": "198.51.100.10", "Forwarded": f"for=203.0.113.{i + 1}"},
                correlation_id=ids[i],
            )
            for i in range(6)
        ]
        assert [r.status_code for r in answers] == [401] * 5 + [429], "Forwarded is not the proxy's"
        records = Admin.sign_in(server.url).records_of(ids[:5], action="login_failed")
        assert {records[i]["ip_address"] for i in ids[:5]} == {"198.51.100.10"}


# -- 7. password in the username field --------------------------------------------------------------

TYPED_PASSWORD = "Tr0ub4dor&3-horse"
OTHER_TEXT = "correct horse battery"


@stacks(SQLITE_MEMORY, POSTGRES_REDIS)
def test_a_stolen_access_token_gets_no_more_guesses_at_the_password_than_a_sign_in(
    environment: dict[str, str],
) -> None:
    """Attack: with a stolen access token, guess the current password through POST /auth/password
    (each guess the per-IP auth limit allows, from many addresses). Rule: the guesses count with the
    account's lockout — after the threshold, 429 with Retry-After, no password verified, the right
    password refused too, and the account's sign-in is locked as after failed sign-ins."""
    env = {**environment, "THALLUS_LOCKOUT_THRESHOLD": "3", "THALLUS_RATE_LIMIT_AUTH": "1000/minute"}
    create_user(env, "pat@example.com")
    with serve(env) as server:
        via = xff("198.51.100.60")
        signed_in = login(server.url, "pat@example.com", PASSWORD, via=via)
        assert signed_in.status_code == 200, signed_in.text
        token = signed_in.json()["access_token"]
        answers = []
        for guess in range(6):
            headers = {"Authorization": f"Bearer {token}", **xff(f"203.0.113.{guess + 1}")}
            body = {"current_password": f"Wrong-Guess-{guess}!", "new_password": NEW_PASSWORD}
            answers.append(request("POST", server.url + PASSWORD_CHANGE, headers=headers, json=body))
        assert [answer.status_code for answer in answers] == [403, 403, 403, 429, 429, 429], [a.text for a in answers]
        assert_rate_limited(answers[-1])
        right = request(
            "POST",
            server.url + PASSWORD_CHANGE,
            headers={"Authorization": f"Bearer {token}", **via},
            json={"current_password": PASSWORD, "new_password": NEW_PASSWORD},
        )
        assert right.status_code == 429, "locked: not even the right password is checked"
        assert login(server.url, "pat@example.com", PASSWORD, via=xff("198.51.100.61")).status_code == 429


@stacks(SQLITE_REDIS)
def test_redis_names_no_account_under_attack(environment: dict[str, str]) -> None:
    """Attack: read Redis (a shared cache is often less guarded than the database) to learn which
    accounts are being guessed at. Rule: no key or value holds the address, its plain SHA-256 (what
    a list of addresses reverses) or its canonical form; only a hash keyed by the service's secret."""
    env = {**environment, "THALLUS_LOCKOUT_THRESHOLD": "2", "THALLUS_RATE_LIMIT_AUTH": "1000/minute"}
    create_user(env, "quinn@example.com")
    with serve(env) as server:
        for guess in range(3):
            login(server.url, "Quinn@Example.com", f"Wrong-{guess}!", via=xff(f"203.0.113.{70 + guess}"))
        assert login(server.url, "quinn@example.com", PASSWORD, via=xff("203.0.113.80")).status_code == 429

    async def dump() -> list[bytes]:
        redis: coredis.Redis[bytes] = coredis.Redis.from_url(env["THALLUS_REDIS_URL"])
        keys = [key async for key in redis.scan_iter(match=env["THALLUS_REDIS_KEY_PREFIX"] + "*")]
        contents: list[bytes] = list(keys)
        for key in keys:
            if await redis.type(key) == b"hash":
                contents += [item for pair in (await redis.hgetall(key)).items() for item in pair]
            elif await redis.type(key) == b"string":
                contents.append(await redis.get(key) or b"")
        return contents

    stored = b"\n".join(asyncio.run(dump()))
    assert b"/lockout/{" in stored, "the lockout lives in Redis on this stack"
    for spelling in ("quinn@example.com", "Quinn@Example.com"):
        assert spelling.encode() not in stored
        assert hashlib.sha256(spelling.encode()).hexdigest()[:32].encode() not in stored


def test_a_password_typed_as_the_identifier_never_reaches_the_audit_log(environment: dict[str, str]) -> None:
    """Attack 7: users type their password into the e-mail field; whoever reads the audit log (or its
    export) collects passwords. Rule: a non-address answers the usual 401 and is audited as
    ``identifier_valid: false`` with a hash, never the text; a valid address is audited as such."""
    create_user(environment, ADMIN_EMAIL, admin=True)
    tries = {"first": TYPED_PASSWORD, "other": OTHER_TEXT, "again": TYPED_PASSWORD, "unknown": "nobody@example.com"}
    ids = {label: new_correlation_id(f"identifier-{label}") for label in tries}
    with serve(environment) as server:
        reference = assert_error(
            login(server.url, ADMIN_EMAIL, WRONG, via=xff("198.51.100.70")), 401, "AuthenticationError"
        )
        for n, (label, identifier) in enumerate(tries.items()):
            answer = login(
                server.url, identifier, "whatever-Pass1!", via=xff(f"198.51.100.{71 + n}"), correlation_id=ids[label]
            )
            body = assert_error(answer, 401, "AuthenticationError")
            assert body["message"] == reference["message"], "the same answer as a wrong password"

        admin = Admin.sign_in(server.url)
        records = admin.records_of(ids.values(), action="login_failed")
        details = {label: records[ids[label]]["details"] or {} for label in tries}
        for label in ("first", "other", "again"):
            assert details[label].get("identifier_valid") is False, details[label]
            assert isinstance(details[label].get("identifier_hash"), str), details[label]
            assert details[label]["identifier_hash"], details[label]
        assert details["first"]["identifier_hash"] == details["again"]["identifier_hash"]
        assert details["first"]["identifier_hash"] != details["other"]["identifier_hash"]
        assert details["unknown"].get("email") == "nobody@example.com", details["unknown"]
        assert details["unknown"].get("identifier_valid") is True, details["unknown"]

        everything = {
            "the audit API": admin.get(AUDIT, limit=1000).text,
            "the CSV export": admin.get(AUDIT_EXPORT, format="csv").text,
        }
    for where, text in everything.items():
        assert "nobody@example.com" in text, f"{where} lacks the records it should hold"
        for typed in (TYPED_PASSWORD, OTHER_TEXT):
            for form in {typed, typed.lower()}:  # as typed, and as a lower-cased 'address'
                assert form not in text, f"{where} holds the submitted identifier {form!r}"


# -- 8. hardening -----------------------------------------------------------------------------------


def refresh_cookie(response: httpx.Response) -> tuple[str, str, list[str]]:
    """The one Set-Cookie that sets (not clears) a cookie: its name, value and attributes."""
    setting = []
    for header in response.headers.get_list("set-cookie"):
        pair, *attributes = (part.strip() for part in header.split(";"))
        if "max-age=0" not in {a.lower().replace(" ", "") for a in attributes}:
            setting.append((header, pair, attributes))
    assert len(setting) == 1, response.headers.get_list("set-cookie")
    header, pair, attributes = setting[0]
    name, _, value = pair.partition("=")
    assert header.startswith(f"{name}={value}")
    return name, value, attributes


@pytest.mark.parametrize(
    ("env_name", "cookie"),
    [
        ("production", "__Secure-thallus_refresh"),
        ("test", "__Secure-thallus_refresh"),
        ("development", "thallus_refresh"),
    ],
)
def test_the_refresh_cookie_carries_the_secure_prefix_outside_development(
    environment: dict[str, str], env_name: str, cookie: str
) -> None:
    """Hardening: a ``__Secure-`` cookie can only be set over https with ``Secure``, so a network or
    sibling-subdomain attacker cannot plant or overwrite it. Rule: production and test name the refresh
    cookie ``__Secure-thallus_refresh`` and refresh with it (rotating it); development keeps
    ``thallus_refresh`` (plain http on localhost)."""
    env = {**environment, "THALLUS_ENV": env_name}
    user = xff("198.51.100.90")
    with serve(env) as server:
        register(server.url, "cookie@example.com", via=user)
        signed_in = login(server.url, "cookie@example.com", PASSWORD, via=user)
        assert signed_in.status_code == 200, signed_in.text
        name, value, attributes = refresh_cookie(signed_in)
        assert name == cookie
        assert ("Secure" in attributes) is (env_name != "development"), attributes

        refreshed = request("POST", server.url + REFRESH, headers={**SAME_ORIGIN, **user, "Cookie": f"{name}={value}"})
        assert refreshed.status_code == 200, refreshed.text
        assert refreshed.json()["access_token"]
        rotated_name, rotated_value, _ = refresh_cookie(refreshed)
        assert (rotated_name, rotated_value != value) == (cookie, True)


def private_modes(data_dir: Path) -> dict[str, str]:
    """Every entry under ``data_dir`` that group or others may use, with its mode."""
    exposed = {}
    for path in [data_dir, *data_dir.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode & 0o077:
            exposed[str(path.relative_to(data_dir.parent))] = oct(mode)
    return exposed


def assert_private(data_dir: Path) -> None:
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    for name in ("thallus.db", "thallus.db-wal", "thallus.db-shm", "secret_key"):
        path = data_dir / name
        if name in ("thallus.db", "secret_key") or path.exists():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, f"{name}: {oct(stat.S_IMODE(path.stat().st_mode))}"
    journal = data_dir / "audit-journal"
    if journal.exists():
        assert stat.S_IMODE(journal.stat().st_mode) == 0o700
        for path in journal.iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert private_modes(data_dir) == {}


def test_the_data_directory_is_private_under_a_permissive_umask(tmp_path: Path) -> None:
    """Hardening: under umask 0 a fresh data directory, its database, secret key and audit journal would
    be world-readable (password hashes, the signing secret, the audit trail). Rule: the data directory
    is 0700, its files 0600, whatever the umask."""
    data_dir = tmp_path / "fresh" / "thallus-data"
    assert not data_dir.exists()
    env = {"THALLUS_ENV": "development", "THALLUS_DATA_DIR": str(data_dir), **CHEAP_ARGON2}
    with serve_under_umask(env, 0) as server:
        create_user(env, ADMIN_EMAIL, admin=True, umask=0)
        browser = {"Sec-Fetch-Site": "same-origin"}
        signed_in = login(server.url, ADMIN_EMAIL, PASSWORD, via=browser)
        assert signed_in.status_code == 200, signed_in.text
        assert login(server.url, ADMIN_EMAIL, WRONG, via=browser).status_code == 401
        admin = Admin(server.url, {"Authorization": f"Bearer {signed_in.json()['access_token']}"})
        written = admin.wait_for(
            lambda items: {"login", "login_failed"} <= {item["action"] for item in items}, actions="login,login_failed"
        )
        assert {"login", "login_failed"} <= {item["action"] for item in written}, "the audit writer wrote nothing"
        assert_private(data_dir)
    assert_private(data_dir)  # and what shutdown wrote
