"""The whole reference service under uvicorn, loaded over loopback by ``wrk``, against a bare app
and an anchor.

Every server is a real process with one uvicorn worker on a free 127.0.0.1 port, all started
up-front and stopped at the end (also after a failure or Ctrl-C):

* ``bare`` — ``benchmarks/bare_service.py``, a plain Starlette app with the same paths, methods and
  statuses, answered from constants, started with ``python -m uvicorn`` (no access log, no
  ``Server`` header, no proxy headers: what ``thallus serve`` passes to uvicorn); the ``×bare``
  denominator;
* ``anchor`` — ``benchmarks/anchor_service.py``, a plain FastAPI app served the same way:
  ``/health``, and ``/api/v1/users/me`` for a Bearer token verified with PyJWT (HS256 pinned, the
  ``kid`` header, the claims Thallus issues required) and looked up in an in-memory user dict, or
  for an ``X-API-Key`` looked up in an in-memory dict: the least an application does to answer the
  same authenticated request; the ``×anchor`` denominator. Its ``/health`` is a bare FastAPI app's;
* ``thallus serve`` (``tests.server.running_server``), ``THALLUS_ENV=test``, limits of
  ``10000000/minute`` so that nothing is refused, each in a temporary ``THALLUS_DATA_DIR`` with a
  user and an API key made by ``thallus users create`` / ``thallus keys create`` when a run sends
  a credential (a Bearer run logs in first: a fresh access token before every run):

  * the shipped configuration (audit on, ``/health`` exempt from the limiter) on each limiter
    storage and database — ``default`` (memory, SQLite), ``redis_sqlite``, ``memory_pg`` and
    ``redis_pg`` (PostgreSQL: a database of the run's own on the server of
    ``THALLUS_TEST_DATABASE_URL``, dropped at the end; Redis: ``THALLUS_TEST_REDIS_URL``, a key
    prefix of the run's own, its keys deleted at the end) — for the anchor table: ``GET /health``,
    ``GET /api/v1/users/me`` with ``X-API-Key`` and with ``Authorization: Bearer`` on each;
  * ``audit_off`` (``THALLUS_AUDIT_ENABLED=false``) for the POST with the audit log off and on;
  * for the limiter, with ``/health`` no longer exempt (``THALLUS_RATE_LIMIT_EXEMPT_PATHS=/metrics``):
    ``limit_off`` (``THALLUS_RATE_LIMIT_ENABLED=false``), ``limit_memory`` and ``limit_redis``.

  A scenario on Redis or PostgreSQL is left out, with the reason, when that server does not answer.

Each scenario is one ``wrk`` run (closed loop, ``--connections`` connections) after an unmeasured
warm-up run; each round runs, per kind of request, the bare app first, then the anchor, then the
scenarios that send it, and every ratio is taken within a round. A Lua script counts every
response's status: a run that saw any other status than the expected one, or a socket error, is
reported invalid instead of being timed. The server's CPU time over the measured run is read from
``/proc/<pid>/stat`` (all its threads). ``--pin`` (default) runs wrk on the first CPU and the
servers on the second. The report names the commit the servers ran (the tree may be mid-change).
Run ``.venv/bin/python benchmarks/bench_service.py --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import secrets
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import coredis
import httpx

from common import ROOT, BenchmarkError, conclude, describe, environment, progress, redacted_url, text_table
from figures import median
from served import (
    Served,
    children_cpu_seconds,
    clean_environment,
    describe_source,
    machine_busy_seconds,
    process_cpu_seconds,
    serve,
    shown_settings,
    source_of_thallus,
    thallus_cli,
)

if str(ROOT) not in sys.path:  # tests.server is imported from the repository root
    sys.path.insert(0, str(ROOT))

from tests.server import free_port

BENCHMARKS = ROOT / "benchmarks"
WRK_SCRIPT = BENCHMARKS / "wrk_statuses.lua"
PACKAGES = ("thallus", "uvicorn", "h11", "httptools", "uvloop", "starlette", "fastapi", "limits", "coredis")
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
REDIS_URL_VARIABLE = "THALLUS_TEST_REDIS_URL"
DEFAULT_POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
POSTGRES_URL_VARIABLE = "THALLUS_TEST_DATABASE_URL"
LIMIT = "10000000/minute"
#: wrk counts a request still unanswered after this long as a timeout (an invalid run).
WRK_TIMEOUT = "5s"
EMAIL = "bench@example.com"
PASSWORD = "Correct-Horse-Battery-9!"
SECRET = "bench-service-secret-" + "k" * 27  # 48 characters
SETTINGS = {
    "THALLUS_ENV": "test",
    "THALLUS_SECRET_KEY": SECRET,
    "THALLUS_ALLOWED_ORIGINS": "https://app.example.com",
    "THALLUS_PUBLIC_ORIGIN": "https://api.example.com",
    "THALLUS_RATE_LIMIT": LIMIT,
    "THALLUS_RATE_LIMIT_AUTH": LIMIT,
    "THALLUS_LOG_LEVEL": "WARNING",
}
EXIT_NO_WRK = 2


# -- what is measured --------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One kind of request, sent identically (the same bytes) to the bare app and to Thallus."""

    kind: str
    method: str
    path: str
    status: int
    api_key: bool = False
    bearer: bool = False

    @property
    def label(self) -> str:
        return (
            f"{self.method} {self.path}"
            + (" + X-API-Key" if self.api_key else "")
            + (" + Bearer" if self.bearer else "")
        )


REQUESTS = {
    request.kind: request
    for request in (
        Request("health", "GET", "/health", 200),
        Request("me", "GET", "/api/v1/users/me", 200, api_key=True),
        Request("me_bearer", "GET", "/api/v1/users/me", 200, bearer=True),
        Request("logout", "POST", "/api/v1/auth/logout", 204),
    )
}
#: the requests the anchor (a plain FastAPI app with PyJWT and in-memory dicts) answers
ANCHOR_KINDS = ("health", "me", "me_bearer")


@dataclass(frozen=True)
class ServerConfig:
    """A ``thallus serve`` configuration: the ``THALLUS_*`` variables it adds to :data:`SETTINGS`."""

    name: str
    description: str
    settings: Mapping[str, str]
    rate_limited: bool = True
    health_exempt: bool = True
    redis: bool = False
    postgres: bool = False


#: The limiter servers limit ``/health`` too, so the limiter can be measured on the cheapest request.
HEALTH_LIMITED = {"THALLUS_RATE_LIMIT_EXEMPT_PATHS": "/metrics"}

THALLUS_SERVERS = {
    config.name: config
    for config in (
        ServerConfig("default", "audit on, rate limits in memory, SQLite", {"THALLUS_AUDIT_ENABLED": "true"}),
        # the shipped configuration on the other storages (the anchor matrix)
        ServerConfig("redis_sqlite", "audit on, rate limits in Redis, SQLite", {}, redis=True),
        ServerConfig("memory_pg", "audit on, rate limits in memory, PostgreSQL", {}, postgres=True),
        ServerConfig("redis_pg", "audit on, rate limits in Redis, PostgreSQL", {}, redis=True, postgres=True),
        ServerConfig("audit_off", "audit off, rate limits in memory", {"THALLUS_AUDIT_ENABLED": "false"}),
        ServerConfig(
            "limit_off",
            "rate limiter off",
            {"THALLUS_RATE_LIMIT_ENABLED": "false", **HEALTH_LIMITED},
            rate_limited=False,
            health_exempt=False,
        ),
        ServerConfig("limit_memory", "rate limits in memory, /health limited", HEALTH_LIMITED, health_exempt=False),
        ServerConfig(
            "limit_redis", "rate limits in Redis, /health limited", HEALTH_LIMITED, health_exempt=False, redis=True
        ),
    )
}


@dataclass(frozen=True)
class Scenario:
    name: str
    server: str
    request: str
    description: str


#: The anchor matrix: each request on the shipped configuration with either limiter storage and
#: either database (the memory/SQLite one is the ``default`` server).
MATRIX = {
    "memory_sqlite": "default",
    "redis_sqlite": "redis_sqlite",
    "memory_pg": "memory_pg",
    "redis_pg": "redis_pg",
}
MATRIX_REQUESTS = {
    "health": ("health", "liveness: every layer, no limiter (/health exempt), no database"),
    "key": ("me", "API key and its user from the identity view (no query)"),
    "bearer": ("me_bearer", "JWT verified, session and user from the identity view (no query)"),
}

SCENARIOS = {
    scenario.name: scenario
    for scenario in (
        *(
            Scenario(f"{prefix}_{storage}", server, kind, description)
            for prefix, (kind, description) in MATRIX_REQUESTS.items()
            for storage, server in MATRIX.items()
        ),
        Scenario("post_audit_off", "audit_off", "logout", "state-changing POST, audit off"),
        Scenario("post_audit_on", "default", "logout", "the same, one `request` audit record each"),
        # the request of the three ratelimit_* scenarios is --ratelimit-request's (default health)
        Scenario("ratelimit_off", "limit_off", "health", "THALLUS_RATE_LIMIT_ENABLED=false"),
        Scenario("ratelimit_memory", "limit_memory", "health", "limiter on, memory storage"),
        Scenario("ratelimit_redis", "limit_redis", "health", "limiter on, Redis storage (THALLUS_REDIS_URL)"),
    )
}


# -- wrk ---------------------------------------------------------------------------------------


def ensure_wrk() -> str:
    """The path of ``wrk``, installed with apt-get when missing and running as root; else exit 2."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0:
        progress("wrk is not on PATH and this is not root, so it cannot be installed: apt-get install wrk")
        raise SystemExit(EXIT_NO_WRK)
    progress("wrk is not on PATH: apt-get update && apt-get install -y wrk")
    apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "wrk"]):
        done = subprocess.run(command, env=apt_env, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            progress(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-1000:]}")
            raise SystemExit(EXIT_NO_WRK)
    found = shutil.which("wrk")
    if not found:
        progress("apt-get installed wrk but it is still not on PATH")
        raise SystemExit(EXIT_NO_WRK)
    return found


def wrk_version(wrk: str) -> str:
    """``wrk 4.1.0 [epoll] …``'s version (``wrk -v`` prints it and exits 1)."""
    done = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10, check=False)
    match = re.search(r"wrk (\S+)", done.stdout + done.stderr)
    return match.group(1) if match else "unknown"


@dataclass
class WrkRun:
    """What one wrk run measured, from the JSON line ``wrk_statuses.lua`` prints."""

    requests: int
    seconds: float
    statuses: dict[int, int]
    errors: dict[str, int]
    latency_us: dict[str, float]
    server_cpu_seconds: float = 0.0
    wrk_cpu_seconds: float = 0.0
    #: CPU time the whole machine spent beyond the server's and wrk's: other load, and Redis
    other_cpu_seconds: float = 0.0
    output: str = ""

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def non_2xx(self) -> int:
        return sum(count for status, count in self.statuses.items() if not 200 <= status < 300)

    @property
    def socket_errors(self) -> int:
        return sum(self.errors[name] for name in ("connect", "read", "write", "timeout"))

    def problems(self, expected: int) -> list[str]:
        """Why the run must not be timed: any status but ``expected``, a socket error, no answer."""
        found = []
        if unexpected := {status: count for status, count in self.statuses.items() if status != expected}:
            found.append(f"statuses other than {expected}: {unexpected}")
        if self.socket_errors:
            found.append(f"socket errors: {self.errors}")
        if not self.requests:
            found.append("no request answered")
        return found

    def document(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "seconds": self.seconds,
            "requests_per_second": self.requests_per_second,
            "p50_ms": self.latency_us["p50"] / 1000,
            "p90_ms": self.latency_us["p90"] / 1000,
            "p99_ms": self.latency_us["p99"] / 1000,
            "p999_ms": self.latency_us["p999"] / 1000,
            "max_ms": self.latency_us["max"] / 1000,
            "statuses": {str(status): count for status, count in sorted(self.statuses.items())},
            "non_2xx": self.non_2xx,
            "errors": self.errors,
            "server_cpu_seconds": self.server_cpu_seconds,
            "server_cpu_us_per_request": self.server_cpu_seconds / self.requests * 1e6 if self.requests else None,
            "server_cpu_share": self.server_cpu_seconds / self.seconds if self.seconds else None,
            "wrk_cpu_share": self.wrk_cpu_seconds / self.seconds if self.seconds else None,
            "other_cpu_share": self.other_cpu_seconds / self.seconds if self.seconds else None,
            "wrk_output": self.output,
        }


@dataclass
class Load:
    """How wrk is run: the binary, its shape, and the CPU it is pinned to (``None``: unpinned)."""

    wrk: str
    connections: int
    threads: int
    cpu: int | None

    def command(self, url: str, request: Request, headers: Sequence[str], seconds: int) -> list[str]:
        pin = ["taskset", "-c", str(self.cpu)] if self.cpu is not None else []
        header_args = [argument for header in headers for argument in ("-H", header)]
        return [
            *pin,
            self.wrk,
            "-t",
            str(self.threads),
            "-c",
            str(self.connections),
            "-d",
            f"{seconds}s",
            "--timeout",
            WRK_TIMEOUT,
            "--latency",
            "-s",
            str(WRK_SCRIPT),
            *header_args,
            url + request.path,
            "--",
            request.method,
        ]

    def run(self, url: str, pid: int, request: Request, headers: Sequence[str], seconds: int) -> WrkRun:
        """One bounded wrk run; the server's CPU time and wrk's are read around it."""
        command = self.command(url, request, headers, seconds)
        server_before, wrk_before, busy_before = (
            process_cpu_seconds(pid),
            children_cpu_seconds(),
            machine_busy_seconds(),
        )
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, check=False)
        server_cpu = process_cpu_seconds(pid) - server_before
        wrk_cpu = children_cpu_seconds() - wrk_before
        other_cpu = max(0.0, machine_busy_seconds() - busy_before - server_cpu - wrk_cpu)
        line = next((line for line in done.stdout.splitlines() if line.startswith("BENCH_SERVICE ")), None)
        if done.returncode != 0 or line is None:
            raise BenchmarkError(
                f"wrk failed ({done.returncode}): {' '.join(command)}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
            )
        data = json.loads(line.removeprefix("BENCH_SERVICE "))
        return WrkRun(
            requests=int(data["requests"]),
            seconds=data["duration_us"] / 1e6,
            statuses={int(status): int(count) for status, count in data["statuses"].items()},
            errors={name: int(count) for name, count in data["errors"].items()},
            latency_us={name: float(value) for name, value in data["latency_us"].items()},
            server_cpu_seconds=server_cpu,
            wrk_cpu_seconds=wrk_cpu,
            other_cpu_seconds=other_cpu,
            output="\n".join(line for line in done.stdout.splitlines() if not line.startswith("BENCH_SERVICE ")),
        )


# -- servers -----------------------------------------------------------------------------------


@dataclass
class ServiceTarget(Served):
    """A running server process: its URL, the credential it expects, its last output lines."""

    name: str
    description: str
    url: str
    process: subprocess.Popen[str]
    settings: dict[str, str] = field(default_factory=dict)
    #: the variables that set this server apart from :data:`SETTINGS`
    variables: dict[str, str] = field(default_factory=dict)
    api_key: str | None = None
    #: an access token (Thallus: from a login, renewed before every run, as it lives 15 minutes)
    bearer_token: str | None = None
    #: whether :meth:`login` can sign in (a Thallus server with the benchmark's user)
    has_user: bool = False
    #: logins made (each a POST with its ``request`` audit record)
    logins: int = 0
    data_dir: str | None = None
    rate_limited: bool = False
    health_exempt: bool = True
    uses_redis: bool = False
    database: str = "-"
    thallus: bool = True
    output: deque[str] = field(default_factory=lambda: deque(maxlen=40), kw_only=True)

    def headers(self, request: Request) -> list[str]:
        # the bare app gets the same header (one it does not read), so both parse the same bytes
        if request.api_key:
            return [f"X-API-Key: {self.api_key or 'thal_' + 'x' * 43}"]
        if request.bearer:
            return [f"Authorization: Bearer {self.bearer_token or 'x' * 300}"]
        return []

    def login(self) -> None:
        """A fresh access token for the Bearer runs (a new session, in the view from its first use)."""
        if not self.has_user:
            return
        response = httpx.post(
            self.url + "/api/v1/auth/login",
            json={"email": EMAIL, "password": PASSWORD},
            headers={"Origin": "https://app.example.com"},
            timeout=30,
        )
        self.logins += 1
        if response.status_code != 200:
            raise BenchmarkError(f"{self.name}: login answered {response.status_code}: {response.text[:300]}")
        self.bearer_token = response.json()["access_token"]


def wait_until_up(process: subprocess.Popen[str], url: str, name: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            raise BenchmarkError(f"{name} exited with {process.returncode}: {output.strip()[-2000:]}")
        try:
            httpx.get(url + "/health", timeout=1)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise BenchmarkError(f"{name} did not answer at {url} within 20 s") from None
            time.sleep(0.1)


def start_bare(stack: ExitStack) -> ServiceTarget:
    return start_uvicorn(stack, "bare", "plain Starlette app, no middleware", "bare_service:app", {})


def start_anchor(stack: ExitStack, anchor: AnchorCredentials) -> ServiceTarget:
    served = start_uvicorn(
        stack,
        "anchor",
        "plain FastAPI app: PyJWT HS256, in-memory user and key dicts",
        "anchor_service:app",
        anchor.environment(),
    )
    served.api_key, served.bearer_token = anchor.api_key, anchor.token
    return served


def start_uvicorn(stack: ExitStack, name: str, description: str, app: str, env: Mapping[str, str]) -> ServiceTarget:
    """``python -m uvicorn`` with what ``thallus serve`` passes to it (no access log, no ``Server``
    header, no proxy headers, the h11 protocol on the asyncio loop — ``thallus serve`` pins both, and
    with uvicorn[standard] installed uvicorn's "auto" would give the others httptools and uvloop),
    one worker."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "--app-dir",
        str(BENCHMARKS),
        app,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--no-access-log",
        "--log-level",
        "warning",
        "--no-server-header",
        "--no-proxy-headers",
        "--http",
        "h11",
        "--loop",
        "asyncio",
    ]
    process = subprocess.Popen(
        command, env=clean_environment(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    served = ServiceTarget(process, name=name, description=description, url=f"http://127.0.0.1:{port}", thallus=False)
    stack.callback(served.stop)
    wait_until_up(process, served.url, f"the {name} app")
    served.drain()
    return served


@dataclass(frozen=True)
class AnchorCredentials:
    """The anchor's signing secret, ``kid``, API key and a Bearer token it accepts (valid a day),
    shaped as Thallus's: an HS256 JWT with ``sub``, ``sid``, ``iat``, ``exp``, ``jti`` and a ``kid``
    header; a ``thal_`` key of 32 random bytes."""

    secret: str
    kid: str
    api_key: str
    token: str

    @classmethod
    def new(cls) -> AnchorCredentials:
        import jwt

        from bare_service import USER

        secret, kid = secrets.token_urlsafe(36), secrets.token_hex(8)
        now = int(time.time())
        claims = {
            "sub": USER["id"],
            "sid": str(uuid.uuid4()),
            "iat": now,
            "exp": now + 86400,
            "jti": str(uuid.uuid4()),
        }
        token = jwt.encode(claims, secret, algorithm="HS256", headers={"kid": kid})
        return cls(secret, kid, "thal_" + secrets.token_urlsafe(32), token)

    def environment(self) -> dict[str, str]:
        return {"BENCH_ANCHOR_SECRET": self.secret, "BENCH_ANCHOR_KID": self.kid, "BENCH_ANCHOR_API_KEY": self.api_key}


def start_thallus(
    stack: ExitStack, config: ServerConfig, redis: RedisTarget | None, *, needs_user: bool, needs_key: bool
) -> ServiceTarget:
    """A data directory (and for PostgreSQL a database of the run's own), a user and an API key made
    by the CLI in it (when a run sends a credential), then ``thallus serve`` on it."""
    data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"thallus-bench-service-{config.name}-"))
    settings = {**SETTINGS, **config.settings, "THALLUS_DATA_DIR": data_dir}
    if config.redis:
        assert redis is not None
        # a prefix of the server's own under the run's (the keys of all are deleted at the end)
        settings |= {"THALLUS_REDIS_URL": redis.url, "THALLUS_REDIS_KEY_PREFIX": f"{redis.prefix}-{config.name}-"}
    if config.postgres:
        url, reason = stack.enter_context(postgres_database(f"service_{config.name}"))
        if url is None:
            raise BenchmarkError(f"{config.name}: {reason}")
        settings["THALLUS_DATABASE_URL"] = url
    env = clean_environment(settings)
    api_key = None
    if needs_user or needs_key:
        thallus_cli(env, "users", "create", "--email", EMAIL, "--password", "-", "--api-access", stdin=PASSWORD + "\n")
    if needs_key:
        api_key = thallus_cli(env, "keys", "create", "--email", EMAIL, "--name", "bench-service")
    server = serve(stack, settings, f"thallus serve ({config.name}: {config.description})")
    served = ServiceTarget(
        server.process,
        name=config.name,
        description=config.description,
        url=server.url,
        settings=shown_settings(settings),
        variables={
            name: redacted_url(value) if name == "THALLUS_DATABASE_URL" else value
            for name, value in settings.items()
            if name not in SETTINGS and name != "THALLUS_DATA_DIR"
        },
        api_key=api_key,
        has_user=needs_user or needs_key,
        data_dir=data_dir,
        rate_limited=config.rate_limited,
        health_exempt=config.health_exempt,
        uses_redis=config.redis,
        database="postgresql" if config.postgres else "sqlite",
    )
    served.drain(server)
    return served


def pin(served: ServiceTarget, cpu: int) -> None:
    """Every thread of the server on ``cpu`` (what ``taskset -a -p -c CPU PID`` does); new threads inherit it."""
    for task in Path(f"/proc/{served.pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), {cpu})
        except ProcessLookupError:  # a thread that has just ended
            continue


# -- Redis -------------------------------------------------------------------------------------


@dataclass
class RedisTarget:
    url: str
    #: a key prefix of this run's own; every key the ``limit_redis`` server creates starts with it
    prefix: str
    version: str | None = None
    keys_deleted: int = 0

    @property
    def display_url(self) -> str:
        """The URL without credentials."""
        return redacted_url(self.url)

    def client(self) -> coredis.Redis[bytes]:
        return coredis.Redis.from_url(self.url, connect_timeout=2, stream_timeout=2)

    def call(self, operation: Callable[[coredis.Redis[bytes]], Any]) -> Any:
        """Run one coroutine-returning operation on a fresh client (this script is synchronous)."""

        async def run() -> Any:
            return await asyncio.wait_for(operation(self.client()), timeout=10)

        return asyncio.run(run())

    def connect(self) -> None:
        info = self.call(lambda client: client.info("server"))
        version = info.get("redis_version")
        self.version = version.decode() if isinstance(version, bytes) else str(version)

    def keys(self) -> list[bytes]:
        async def scan(client: coredis.Redis[bytes]) -> list[bytes]:
            return [key async for key in client.scan_iter(match=f"{self.prefix}*")]

        keys: list[bytes] = self.call(scan)
        return keys

    def delete_keys(self) -> None:
        """SCAN + DEL every key under the run's prefix."""

        async def delete(client: coredis.Redis[bytes]) -> int:
            keys = [key async for key in client.scan_iter(match=f"{self.prefix}*")]
            deleted = 0
            for start in range(0, len(keys), 1000):
                deleted += await client.delete(tuple(keys[start : start + 1000]))
            return deleted

        self.keys_deleted += int(self.call(delete))

    def cpu_seconds(self) -> float:
        """The Redis server's own CPU time (``INFO cpu``, main thread and the rest)."""
        info = self.call(lambda client: client.info("cpu"))
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def postgres_unreachable() -> str | None:
    """Why the PostgreSQL servers cannot run (the server of ``THALLUS_TEST_DATABASE_URL`` does not
    answer), or ``None``."""
    url = os.environ.get(POSTGRES_URL_VARIABLE, DEFAULT_POSTGRES_URL)
    try:
        _postgres_execute(url, "SELECT 1")
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        return f"PostgreSQL at {redacted_url(url)} is not reachable ({type(exc).__name__}: {exc})"
    return None


def connect_redis(skip: bool) -> tuple[RedisTarget | None, str | None]:
    """The run's Redis target, or ``None`` and the reason the ``redis`` server is left out."""
    target = RedisTarget(
        os.environ.get(REDIS_URL_VARIABLE, DEFAULT_REDIS_URL),
        f"thallus-bench-service-{os.getpid()}-{secrets.token_hex(4)}",
    )
    if skip:
        return None, "--no-redis"
    try:
        target.connect()
    except Exception as exc:  # any failure to reach it: leave the Redis scenario out, say why
        return None, f"Redis at {target.display_url} is not reachable: {type(exc).__name__}: {exc}"
    return target, None


# -- PostgreSQL and the source tree ---------------------------------------------------------------


def _postgres_dsn(url: str) -> str:
    """An asyncpg DSN from a SQLAlchemy URL (``postgresql+asyncpg://`` → ``postgresql://``)."""
    scheme, _, rest = url.partition("://")
    return "postgresql://" + rest if scheme.startswith("postgresql") else url


def _postgres_execute(url: str, statement: str) -> None:
    async def execute() -> None:
        connection = await asyncpg.connect(_postgres_dsn(url), timeout=5)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(execute())


@contextmanager
def postgres_database(purpose: str) -> Iterator[tuple[str | None, str | None]]:
    """A database of this run's own on the server of ``THALLUS_TEST_DATABASE_URL`` (as
    ``tests/databases.py`` makes one), dropped at the end (``WITH (FORCE)``, also after a failure):
    ``(url, None)``, or ``(None, reason)`` when the server does not answer."""
    server = os.environ.get(POSTGRES_URL_VARIABLE, DEFAULT_POSTGRES_URL)
    base, _, _ = server.rpartition("/")
    name = f"thallus_bench_{purpose}_{os.getpid()}_{secrets.token_hex(3)}"
    try:
        _postgres_execute(server, f'CREATE DATABASE "{name}"')
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        yield None, f"PostgreSQL at {redacted_url(server)} is not reachable ({type(exc).__name__}: {exc})"
        return
    try:
        yield f"{base}/{name}", None
    finally:
        _postgres_execute(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- checks ------------------------------------------------------------------------------------


def check_request(served: ServiceTarget, request: Request, redis: RedisTarget | None) -> None:
    """Send the scenario's request once and check it is answered as the run assumes, so a
    misconfiguration (a refusal, a limiter that is off or failing open) is never timed."""
    if request.bearer and served.thallus:
        served.login()
    headers = dict(header.split(": ", 1) for header in served.headers(request))
    if request.method != "GET":
        headers["Content-Length"] = "0"
    response = httpx.request(request.method, served.url + request.path, headers=headers, timeout=10)
    problems = []
    if response.status_code != request.status:
        problems.append(f"status {response.status_code}, expected {request.status}: {response.text[:300]}")
    if served.thallus:
        if "x-correlation-id" not in response.headers or response.headers.get("x-content-type-options") != "nosniff":
            problems.append("no X-Correlation-ID / security headers: not the Thallus stack?")
        limited = "ratelimit-policy" in response.headers
        if limited != (served.rate_limited and not (request.path == "/health" and served.health_exempt)):
            problems.append(f"RateLimit-Policy header {'present' if limited else 'missing'}")
        if limited and served.uses_redis and redis is not None and not redis.keys():
            problems.append(f"no Redis key under {redis.prefix!r}: the limiter is not using Redis")
    expected_email = EMAIL if served.thallus else bare_user_email()
    if (
        request.path == "/api/v1/users/me"
        and response.status_code == 200
        and response.json().get("email") != expected_email
    ):
        problems.append(f"unexpected body {response.text[:300]}")
    if problems:
        raise BenchmarkError(f"{served.name}: {request.label}: " + "; ".join(problems))


def bare_user_email() -> str:
    from bare_service import USER

    return str(USER["email"])


def count_request_records(served: ServiceTarget) -> int | None:
    """``request`` audit records in a stopped server's SQLite database."""
    if served.data_dir is None or served.database != "sqlite":
        return None
    path = Path(served.data_dir) / "thallus.db"
    with closing(sqlite3.connect(path)) as connection:
        return int(connection.execute("SELECT count(*) FROM audit_logs WHERE action = 'request'").fetchone()[0])


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Measured:
    round_number: int
    name: str
    server: str
    request: Request
    warmup: WrkRun | None
    run: WrkRun
    problems: list[str]
    redis_cpu_seconds: float | None = None

    @property
    def valid(self) -> bool:
        return not self.problems

    def document(self) -> dict[str, Any]:
        return {
            "round": self.round_number,
            "name": self.name,
            "server": self.server,
            "request": self.request.label,
            "valid": self.valid,
            "problems": self.problems,
            "warmup": self.warmup.document() if self.warmup else None,
            "measured": self.run.document(),
            "redis_cpu_us_per_request": (
                self.redis_cpu_seconds / self.run.requests * 1e6
                if self.redis_cpu_seconds is not None and self.run.requests
                else None
            ),
        }


def bare_name(kind: str) -> str:
    return f"bare/{kind}"


def measure(
    load: Load,
    served: ServiceTarget,
    request: Request,
    *,
    name: str,
    round_number: int,
    options: argparse.Namespace,
    redis: RedisTarget | None,
) -> Measured:
    """A warm-up run, then the measured run (with the Redis server's CPU time around it, for ``redis``)."""
    if request.bearer and served.thallus:
        served.login()  # an access token lives 15 minutes; a whole run may take longer
    headers = served.headers(request)
    warmup = None
    if options.warmup > 0:
        warmup = load.run(served.url, served.pid, request, headers, options.warmup)
    redis_before = redis.cpu_seconds() if served.uses_redis and redis is not None else None
    run = load.run(served.url, served.pid, request, headers, options.seconds)
    redis_cpu = redis.cpu_seconds() - redis_before if redis is not None and redis_before is not None else None
    problems = run.problems(request.status)
    if warmup is not None:
        problems += [f"warm-up: {problem}" for problem in warmup.problems(request.status)]
    measured = Measured(round_number, name, served.name, request, warmup, run, problems, redis_cpu)
    latency = run.latency_us
    progress(
        f"  round {round_number} {name:<16} {run.requests_per_second:8.0f} req/s  p50 {latency['p50'] / 1000:6.2f}  "
        f"p99 {latency['p99'] / 1000:6.2f} ms  CPU {run.server_cpu_seconds / max(run.requests, 1) * 1e6:5.0f} µs/req  "
        f"other CPU {run.other_cpu_seconds / run.seconds * 100:3.0f} %  statuses {run.statuses}"
        + (f"  INVALID: {'; '.join(problems)}" if problems else "")
    )
    return measured


def anchor_name(kind: str) -> str:
    return f"anchor/{kind}"


def plan(scenarios: Sequence[str], ratelimit_request: str, *, anchor: bool = True) -> list[tuple[str, str, str]]:
    """One round's runs in order, ``(name, server, request kind)``: per kind of request, the bare
    run first, then the anchor's (for the kinds it answers), then the scenarios that send it (so
    each ratio compares runs minutes apart at most)."""
    kinds = {
        name: ratelimit_request if name.startswith("ratelimit_") else SCENARIOS[name].request for name in scenarios
    }
    order = []
    for kind in REQUESTS:
        chosen = [name for name in SCENARIOS if kinds.get(name) == kind]
        if chosen:
            order.append((bare_name(kind), "bare", kind))
            if anchor and kind in ANCHOR_KINDS:
                order.append((anchor_name(kind), "anchor", kind))
            order += [(name, SCENARIOS[name].server, kind) for name in chosen]
    return order


def run(options: argparse.Namespace) -> dict[str, Any]:
    wrk = ensure_wrk()
    cpus = sorted(os.sched_getaffinity(0))
    pinned = options.pin and len(cpus) >= 2 and shutil.which("taskset") is not None
    load = Load(wrk, options.connections, options.threads, cpus[0] if pinned else None)
    server_cpu = cpus[1] if pinned else None
    redis: RedisTarget | None = None
    redis_skipped: str | None = "not needed"
    on_redis = [name for name in options.scenarios if THALLUS_SERVERS[SCENARIOS[name].server].redis]
    if on_redis:
        redis, redis_skipped = connect_redis(options.no_redis)
        if redis is None:
            progress(f"{', '.join(on_redis)} left out: {redis_skipped}")
            options.scenarios = [name for name in options.scenarios if name not in on_redis]
    postgres_skipped: str | None = "not needed"
    on_postgres = [name for name in options.scenarios if THALLUS_SERVERS[SCENARIOS[name].server].postgres]
    if on_postgres:
        postgres_skipped = "--no-postgres" if options.no_postgres else postgres_unreachable()
        if postgres_skipped:
            progress(f"{', '.join(on_postgres)} left out: {postgres_skipped}")
            options.scenarios = [name for name in options.scenarios if name not in on_postgres]
    document: dict[str, Any] = {
        "benchmark": "thallus bench_service",
        "environment": environment(PACKAGES),
        "source": source_of_thallus(SETTINGS, package_tree=True),
        "wrk": {"path": wrk, "version": wrk_version(wrk)},
        "options": {
            "seconds": options.seconds,
            "warmup": options.warmup,
            "connections": options.connections,
            "threads": options.threads,
            "rounds": options.rounds,
            "scenarios": options.scenarios,
            "pin": options.pin,
            "timeout": WRK_TIMEOUT,
            "limit": LIMIT,
            "ratelimit_request": options.ratelimit_request,
        },
        "pinning": {"wrk_cpu": load.cpu, "server_cpu": server_cpu, "cpus": cpus}
        if pinned
        else {"wrk_cpu": None, "server_cpu": None, "cpus": cpus},
        "redis": {
            "url": redis.display_url if redis else None,
            "version": redis.version if redis else None,
            "prefix": redis.prefix if redis else None,
            "skipped": redis_skipped,
        },
        "postgres": {
            "url": redacted_url(os.environ.get(POSTGRES_URL_VARIABLE, DEFAULT_POSTGRES_URL)),
            "skipped": postgres_skipped,
        },
    }
    order = plan(options.scenarios, options.ratelimit_request, anchor=options.anchor)
    if not order:
        raise BenchmarkError(f"nothing left to run (Redis: {redis_skipped}; PostgreSQL: {postgres_skipped})")
    needed = {server for _, server, _ in order}
    measured: list[Measured] = []
    servers: dict[str, ServiceTarget] = {}
    with ExitStack() as stack:
        if redis is not None:
            stack.callback(redis.delete_keys)
        progress(f"starting {len(needed)} servers (all up-front, one uvicorn worker each): {', '.join(sorted(needed))}")
        anchor = AnchorCredentials.new()
        if "bare" in needed:
            servers["bare"] = start_bare(stack)
            # the bare app reads no credential; it is sent the anchor's, so both parse the same bytes
            servers["bare"].api_key, servers["bare"].bearer_token = anchor.api_key, anchor.token
        if "anchor" in needed:
            servers["anchor"] = start_anchor(stack, anchor)
        for name, config in THALLUS_SERVERS.items():
            if name in needed:
                needs_key = any(server == name and REQUESTS[kind].api_key for _, server, kind in order)
                needs_user = any(server == name and REQUESTS[kind].bearer for _, server, kind in order)
                servers[name] = start_thallus(stack, config, redis, needs_user=needs_user, needs_key=needs_key)
        for _, server_name, kind in order:
            check_request(servers[server_name], REQUESTS[kind], redis)
        for served in servers.values():
            progress(f"  {served.name:<12} {served.url}  pid {served.pid}  ({served.description})")
        progress(
            f"{options.rounds} round(s) of {len(order)} runs, each {options.warmup} s warm-up + {options.seconds} s, "
            f"{options.connections} connections, {options.threads} wrk thread(s), "
            + (f"wrk on CPU {load.cpu}, servers on CPU {server_cpu}" if pinned else "unpinned")
        )
        for round_number in range(1, options.rounds + 1):
            for name, server_name, kind in order:
                served = servers[server_name]
                if server_cpu is not None:
                    pin(served, server_cpu)
                measured.append(
                    measure(
                        load, served, REQUESTS[kind], name=name, round_number=round_number, options=options, redis=redis
                    )
                )
        for served in servers.values():
            served.stop()  # flushes the audit writers before their records are counted
        document["servers"] = {
            served.name: {
                "url": served.url,
                "pid": served.pid,
                "description": served.description,
                "settings": served.settings,
                "variables": served.variables,
                "exit_code": served.process.returncode,
                "output": list(served.output),
            }
            for served in servers.values()
        }
        document["audit_records"] = audit_check(servers, measured, order, options.connections)
    if redis is not None:
        document["redis"]["keys_deleted"] = redis.keys_deleted
    document["runs"] = [item.document() for item in measured]
    document["summary"] = summarise(measured, [name for name, _, _ in order])
    document["comparisons"] = compare(document["summary"])
    return document


def audit_check(
    servers: Mapping[str, ServiceTarget],
    measured: Sequence[Measured],
    order: Sequence[tuple[str, str, str]],
    connections: int,
) -> dict[str, Any]:
    """Per ``thallus serve`` on SQLite: the POSTs wrk counted as answered (warm-ups, the check
    request and the benchmark's own logins included) and the ``request`` records stored. wrk does
    not count requests still in flight when it stops, so up to ``connections`` more per wrk run may
    have been answered and recorded."""
    result = {}
    for served in servers.values():
        if not served.thallus or served.database != "sqlite":
            continue
        runs = [item for item in measured if item.server == served.name and item.request.method == "POST"]
        answered = sum(item.run.requests + (item.warmup.requests if item.warmup else 0) for item in runs)
        checks = sum(1 for _, server, kind in order if server == served.name and kind == "logout")
        result[served.name] = {
            "posts_answered": answered + checks + served.logins,
            "wrk_runs": sum(2 if item.warmup else 1 for item in runs),
            "connections": connections,
            "request_records": count_request_records(served),
            "audit_enabled": served.settings.get("THALLUS_AUDIT_ENABLED", "true") != "false",
        }
    return result


def round_ratios(valid: Sequence[Measured], baseline: str, measured: Sequence[Measured]) -> dict[str, list[float]]:
    """Per valid round of a scenario: its req/s, p50, p99 and CPU per request over those of the
    ``baseline`` server's run of the same request in the same round (none for the baseline itself)."""
    base_runs = {
        (item.round_number, item.request.kind): item for item in measured if item.server == baseline and item.valid
    }
    ratios: dict[str, list[float]] = {"rps": [], "p50": [], "p99": [], "cpu": []}
    for item in valid:
        base = base_runs.get((item.round_number, item.request.kind))
        if base is None or item.server == baseline:
            continue
        mine, theirs = item.run.document(), base.run.document()
        for name, figure in (
            ("rps", "requests_per_second"),
            ("p50", "p50_ms"),
            ("p99", "p99_ms"),
            ("cpu", "server_cpu_us_per_request"),
        ):
            if theirs[figure]:  # wrk rounds a sub-microsecond latency, a short run's CPU, to 0
                ratios[name].append(mine[figure] / theirs[figure])
    return ratios


def relative_spread(values: Sequence[float]) -> float | None:
    """(max − min) / median of the rounds' values; ``None`` with fewer than two."""
    if len(values) < 2:
        return None
    middle = statistics.median(values)
    return (max(values) - min(values)) / middle if middle else None


def summarise(measured: Sequence[Measured], names: Sequence[str]) -> dict[str, Any]:
    """Per scenario (and bare and anchor run): the median over its valid rounds, and per-round
    ratios to the bare and to the anchor run of the same request in the same round, also as medians
    (the rounds' own ratios are kept too, for the spread)."""
    summary: dict[str, Any] = {}
    for name in names:
        runs = [item for item in measured if item.name == name]
        valid = [item for item in runs if item.valid]
        docs = [item.run.document() for item in valid]

        def middle(key: str, docs: list[dict[str, Any]] = docs) -> float | None:
            return median([doc[key] for doc in docs if doc[key] is not None])

        ratios = round_ratios(valid, "bare", measured)
        anchor_ratios = round_ratios(valid, "anchor", measured)
        redis_cpu = [
            item.redis_cpu_seconds / item.run.requests * 1e6
            for item in valid
            if item.redis_cpu_seconds is not None and item.run.requests
        ]
        first = runs[0]
        summary[name] = {
            "server": first.server,
            "request": first.request.label,
            "rounds": len(runs),
            "valid_rounds": len(valid),
            "problems": [problem for item in runs for problem in item.problems],
            "non_2xx": sum(item.run.non_2xx + (item.warmup.non_2xx if item.warmup else 0) for item in runs),
            "requests_per_second": middle("requests_per_second"),
            "p50_ms": middle("p50_ms"),
            "p90_ms": middle("p90_ms"),
            "p99_ms": middle("p99_ms"),
            "server_cpu_us_per_request": middle("server_cpu_us_per_request"),
            "server_cpu_share": middle("server_cpu_share"),
            "wrk_cpu_share": middle("wrk_cpu_share"),
            "other_cpu_share": middle("other_cpu_share"),
            "redis_cpu_us_per_request": median(redis_cpu),
            "rounds_rps": [doc["requests_per_second"] for doc in docs],
            "rps_spread": relative_spread([doc["requests_per_second"] for doc in docs]),
            "vs_bare": {key: median(values) for key, values in ratios.items()},
            "vs_anchor": {key: median(values) for key, values in anchor_ratios.items()},
            "vs_anchor_rounds": anchor_ratios,
        }
    return summary


def _ratio(summary: Mapping[str, Any], top: str, bottom: str, key: str) -> float | None:
    a, b = summary.get(top, {}).get(key), summary.get(bottom, {}).get(key)
    return a / b if a is not None and b else None


def _difference(summary: Mapping[str, Any], top: str, bottom: str, key: str) -> float | None:
    a, b = summary.get(top, {}).get(key), summary.get(bottom, {}).get(key)
    return a - b if a is not None and b is not None else None


def compare(summary: Mapping[str, Any]) -> dict[str, Any]:
    """Audit on vs off, and each limiter vs none, from the medians."""
    pairs = {
        "audit_on_vs_off": ("post_audit_on", "post_audit_off"),
        "ratelimit_memory_vs_off": ("ratelimit_memory", "ratelimit_off"),
        "ratelimit_redis_vs_off": ("ratelimit_redis", "ratelimit_off"),
    }
    result = {}
    for label, (top, bottom) in pairs.items():
        if top in summary and bottom in summary:
            result[label] = {
                "requests_per_second": _ratio(summary, top, bottom, "requests_per_second"),
                "p50": _ratio(summary, top, bottom, "p50_ms"),
                "p99": _ratio(summary, top, bottom, "p99_ms"),
                "server_cpu_us_added": _difference(summary, top, bottom, "server_cpu_us_per_request"),
            }
    return result


# -- reporting ---------------------------------------------------------------------------------


def _number(value: float | None, form: str = ".2f") -> str:
    return "-" if value is None or math.isnan(value) else format(value, form)


def render(document: dict[str, Any]) -> str:
    options = document["options"]
    pinning = document["pinning"]
    pinned = (
        f"wrk pinned to CPU {pinning['wrk_cpu']}, servers to CPU {pinning['server_cpu']} (taskset)"
        if pinning["wrk_cpu"] is not None
        else "unpinned: wrk and the server share the CPUs"
    )
    lines = [
        *describe(document["environment"]),
        describe_source(document["source"]),
        f"wrk {document['wrk']['version']}: {options['connections']} connections, {options['threads']} thread(s), "
        f"{options['seconds']} s measured after {options['warmup']} s warm-up, {options['rounds']} round(s), "
        f"closed loop; {pinned}",
        f"servers: one uvicorn worker each on 127.0.0.1, all up-front; limits {options['limit']}",
        "",
    ]
    header = (
        "run",
        "server",
        "request",
        "req/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "non-2xx",
        "CPU µs/req",
        "server CPU",
        "wrk CPU",
        "other CPU",
        "req/s ×bare",
        "p50 ×bare",
        "p99 ×bare",
        "req/s ×anchor",
        "p99 ×anchor",
        "req/s spread",
    )
    rows: list[tuple[str, ...]] = []
    for name, item in document["summary"].items():
        ratios = item["vs_bare"]
        if not item["valid_rounds"]:
            invalid = (name, item["server"], item["request"], "INVALID", "-", "-", "-", str(item["non_2xx"]))
            rows.append(invalid + ("-",) * (len(header) - len(invalid)))
            continue
        rows.append(
            (
                name,
                item["server"],
                item["request"],
                _number(item["requests_per_second"], ",.0f"),
                _number(item["p50_ms"]),
                _number(item["p90_ms"]),
                _number(item["p99_ms"]),
                str(item["non_2xx"]),
                _number(item["server_cpu_us_per_request"], ".0f"),
                _number(item["server_cpu_share"] * 100 if item["server_cpu_share"] is not None else None, ".0f") + " %",
                _number(item["wrk_cpu_share"] * 100 if item["wrk_cpu_share"] is not None else None, ".0f") + " %",
                _number(item["other_cpu_share"] * 100 if item["other_cpu_share"] is not None else None, ".0f") + " %",
                _number(ratios["rps"], ".3f"),
                _number(ratios["p50"], ".2f"),
                _number(ratios["p99"], ".2f"),
                _number(item["vs_anchor"]["rps"], ".3f"),
                _number(item["vs_anchor"]["p99"], ".2f"),
                _number(item["rps_spread"] * 100 if item["rps_spread"] is not None else None, ".0f") + " %",
            )
        )
    lines += text_table(header, rows, align="lll" + "r" * (len(header) - 3))
    lines += ["", *anchor_table(document), "", *legend(document), "", *notes(document)]
    return "\n".join(lines)


#: Targets of the anchor table (figures to compare with, never assertions): per request prefix,
#: the least req/s ratio and the most p99 ratio against the anchor (whose /health is a bare FastAPI app's).
ANCHOR_TARGETS = {"health": (0.9, None), "key": (0.7, 1.5), "bearer": (0.7, 1.5)}
STORAGES = {
    "memory_sqlite": ("memory", "SQLite"),
    "redis_sqlite": ("Redis", "SQLite"),
    "memory_pg": ("memory", "PostgreSQL"),
    "redis_pg": ("Redis", "PostgreSQL"),
}


def anchor_table(document: Mapping[str, Any]) -> list[str]:
    """Thallus over the anchor per request, limiter storage and database: the medians of the rounds'
    ratios, every round's req/s ratio, and whether the median meets the target."""
    summary = document["summary"]
    rows = []
    for prefix, (kind, _) in MATRIX_REQUESTS.items():
        anchor = summary.get(anchor_name(kind))
        for storage, (limiter, database) in STORAGES.items():
            item = summary.get(f"{prefix}_{storage}")
            if item is None or anchor is None or not item["valid_rounds"] or not anchor["valid_rounds"]:
                continue
            ratios, rounds = item["vs_anchor"], item["vs_anchor_rounds"]
            least_rps, most_p99 = ANCHOR_TARGETS[prefix]
            verdicts = []
            if ratios["rps"] is not None:
                verdicts.append(f"req/s {'meets' if ratios['rps'] >= least_rps else 'misses'} ≥ {least_rps}×")
            if most_p99 is not None and ratios["p99"] is not None:
                verdicts.append(f"p99 {'meets' if ratios['p99'] <= most_p99 else 'misses'} ≤ {most_p99}×")
            rows.append(
                (
                    REQUESTS[kind].label,
                    limiter,
                    database,
                    _number(item["requests_per_second"], ",.0f"),
                    _number(anchor["requests_per_second"], ",.0f"),
                    _number(ratios["rps"], ".3f"),
                    " ".join(_number(value, ".2f") for value in rounds["rps"]) or "-",
                    _number(item["p99_ms"]),
                    _number(anchor["p99_ms"]),
                    _number(ratios["p99"], ".2f"),
                    " ".join(_number(value, ".2f") for value in rounds["p99"]) or "-",
                    ", ".join(verdicts),
                )
            )
    if not rows:
        return []
    header = (
        "request",
        "limiter",
        "database",
        "req/s",
        "anchor req/s",
        "req/s ×anchor",
        "per round",
        "p99 ms",
        "anchor p99",
        "p99 ×anchor",
        "per round",
        "target (a figure, not a gate)",
    )
    return [
        "Thallus / anchor (a plain FastAPI app: PyJWT HS256, in-memory user and key dicts; its /health is a bare "
        "FastAPI app's). Ratios are the medians of the rounds' ratios, each against the anchor's run of the same "
        "round:",
        *text_table(header, rows, align="lll" + "r" * 8 + "l"),
    ]


def legend(document: dict[str, Any]) -> list[str]:
    """One line per server: what it is and the variables that set it apart from :data:`SETTINGS`."""
    common = ", ".join(f"{name}={value}" for name, value in SETTINGS.items() if name != "THALLUS_SECRET_KEY")
    lines = [
        f"servers (thallus serve: {common}, a 48-character secret, a temporary THALLUS_DATA_DIR with the SQLite "
        "file, or THALLUS_DATABASE_URL: a PostgreSQL database of the run's own):"
    ]
    for name, server in document.get("servers", {}).items():
        variables = " ".join(f"{variable}={value}" for variable, value in server["variables"].items())
        lines.append(f"  {name:<13} {server['description']}" + (f" [{variables}]" if variables else ""))
    return lines


def notes(document: dict[str, Any]) -> list[str]:
    found = []
    comparisons = document["comparisons"]
    summary = document["summary"]
    if audit := comparisons.get("audit_on_vs_off"):
        found.append(
            f"audit on/off (POST): p99 ×{_number(audit['p99'], '.3f')}, p50 ×{_number(audit['p50'], '.3f')}, "
            f"req/s ×{_number(audit['requests_per_second'], '.3f')}, "
            f"server CPU {_number(audit['server_cpu_us_added'], '+.0f')} µs/req"
        )
    for label, storage in (("ratelimit_memory_vs_off", "memory"), ("ratelimit_redis_vs_off", "Redis")):
        if limiter := comparisons.get(label):
            found.append(
                f"rate limiter ({storage}) vs off: req/s ×{_number(limiter['requests_per_second'], '.3f')}, "
                f"p50 ×{_number(limiter['p50'], '.3f')}, p99 ×{_number(limiter['p99'], '.3f')}, "
                f"server CPU {_number(limiter['server_cpu_us_added'], '+.0f')} µs/req"
            )
    if (redis_cpu := summary.get("ratelimit_redis", {}).get("redis_cpu_us_per_request")) is not None:
        found.append(f"Redis server CPU during ratelimit_redis: {redis_cpu:.0f} µs/req (INFO cpu)")
    postgres = document["postgres"]
    if postgres["skipped"] and postgres["skipped"] != "not needed":
        found.append(f"PostgreSQL scenarios left out: {postgres['skipped']}")
    elif postgres["skipped"] is None:
        found.append(f"PostgreSQL at {postgres['url']}: one database per server, dropped at the end")
    redis = document["redis"]
    if redis["skipped"] and redis["skipped"] != "not needed":
        found.append(f"scenarios on Redis left out: {redis['skipped']}")
    elif redis["url"]:
        found.append(
            f"Redis {redis['version']} at {redis['url']}, key prefix {redis['prefix']}: "
            f"{redis.get('keys_deleted', 0)} keys left to delete at the end (SCAN + DEL; a key idle for a whole "
            "window has expired by itself)"
        )
    for name, check in document.get("audit_records", {}).items():
        records = check["request_records"]
        if not check["posts_answered"] and not records:
            continue
        if check["audit_enabled"]:
            verdict = (
                "one per POST"
                if records is not None
                and 0 <= records - check["posts_answered"] <= check["wrk_runs"] * check["connections"]
                else "MISMATCH"
            )
        else:
            verdict = "none, as audit is off" if records == 0 else "MISMATCH"
        found.append(
            f"audit records of {name}: {records:,} `request` records for {check['posts_answered']:,} POSTs wrk "
            f"counted (+ those in flight when each of {check['wrk_runs']} wrk runs stopped): {verdict}"
        )
    for name, item in summary.items():
        if item["problems"]:
            found.append(f"INVALID {name}: " + "; ".join(item["problems"]))
    for name, server in document.get("servers", {}).items():
        if server["output"]:
            found.append(
                f"{name} server wrote (last lines): " + " | ".join(line[:200] for line in server["output"][-3:])
            )
    return found


# -- entry point -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=8, help="measured seconds per wrk run (default 8)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured wrk seconds before each run (default 2)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument(
        "--rounds", type=int, default=2, help="rounds of every run (default 2); medians shown, every round's ratio"
    )
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"comma-separated subset of {','.join(SCENARIOS)}"
    )
    parser.add_argument(
        "--ratelimit-request",
        choices=("health", "me"),
        default="health",
        help="request of the ratelimit_* scenarios: GET /health, no longer exempt on their servers (default), "
        "or me: GET /api/v1/users/me with the API key",
    )
    parser.add_argument("--no-redis", action="store_true", help="leave out the scenarios on Redis")
    parser.add_argument(
        "--no-postgres", action="store_true", help="leave out the scenarios on PostgreSQL (THALLUS_TEST_DATABASE_URL)"
    )
    parser.add_argument(
        "--anchor",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the anchor (plain FastAPI + PyJWT + in-memory dicts) beside the bare app (default on)",
    )
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pin wrk to the first CPU and the servers to the second (default on)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    options = parser.parse_args(argv)
    scenarios = [name.strip() for name in options.scenarios.split(",") if name.strip()]
    if unknown := set(scenarios) - set(SCENARIOS):
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    options.scenarios = [name for name in SCENARIOS if name in scenarios]
    if not options.scenarios:
        parser.error("no scenario chosen")
    if options.seconds < 1 or options.warmup < 0 or options.rounds < 1 or options.threads < 1:
        parser.error("--seconds, --rounds and --threads must be >= 1, --warmup >= 0")
    if options.connections < options.threads:
        parser.error("--connections must be at least --threads")
    return options


def main(argv: Sequence[str] | None = None) -> None:
    options = parse_args(argv)
    conclude(
        "bench_service",
        lambda: run(options),
        render,
        print_json=options.json,
        invalid=lambda document: any(not item["valid"] for item in document["runs"]),
        stopped="servers stopped",
    )


if __name__ == "__main__":
    main()
