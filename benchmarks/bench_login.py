"""Sign-in under load: login throughput, and a burst of concurrent logins against the server's memory
and a legitimate API-key client.

Each verification is Argon2id at production's cost (t=3, 64 MiB, p=4: the ``THALLUS_ARGON2_*``
variables are not set), so logins are what a burst of sign-ins, or of guesses, turns into memory and
CPU. Unbounded, 150 at once held gigabytes and starved every other request; the service now caps the
operations per process (``THALLUS_PASSWORD_HASH_CONCURRENCY``, default two per CPU) and answers a
request that waited ``THALLUS_PASSWORD_HASH_MAX_WAIT`` seconds (default 5) for a slot with
``503 ServiceUnavailableError`` and ``Retry-After``. Against one real ``thallus serve`` on 127.0.0.1
(``tests.server.running_server``, one uvicorn worker, so the server is the ``Popen``'s pid;
``THALLUS_ENV=test``, SQLite in a temporary data directory, ``THALLUS_TRUSTED_PROXIES=127.0.0.1``,
the shipped rate limits and lockout), each round measures:

* **throughput** — successful logins per second and their p50/p99 with 1 (sequential) and
  ``--concurrency`` clients in a closed loop for ``--seconds``; each client signs in as a user of its
  own with the right password (so neither the lockout's failure count nor its in-flight cap
  interferes), every login from an ``X-Forwarded-For`` address never used before (so the per-address
  auth limit, 10/minute, never refuses one). Any status but 200 makes the run INVALID;
* **the API-key baseline** — sequential ``GET /api/v1/users/me`` with ``X-API-Key`` for ``--seconds``;
* **the burst** — ``--burst`` logins (default 150) from as many addresses, each for an unknown
  address with a wrong password (the dummy hash costs a real verification; distinct subjects keep
  the lockout out), prepared on pre-opened connections and released at once, while the API-key
  client keeps sending. Reported: the burst's statuses (401, 429, 503, other 5xx), its duration, the
  server's peak RSS growth (``VmHWM`` after ``/proc/<pid>/clear_refs`` reset it, over ``VmRSS``
  before; sampled ``VmRSS`` besides), and the API-key client's requests and latency meanwhile.

Every round is printed, and the spread (min–median–max) of each figure; never only the best.
Run ``.venv/bin/python benchmarks/bench_login.py --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import ssl
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from common import ROOT, BenchmarkError, conclude, describe, environment, progress, text_table
from figures import ms, number, percentile, spread_of, spread_table
from served import (
    CpuMeter,
    CpuUse,
    Sampler,
    Served,
    clean_environment,
    describe_import,
    serve,
    settle,
    source_of_thallus,
    thallus_cli,
)

if str(ROOT) not in sys.path:  # the memory readings are shared with tests/test_bodies_served.py
    sys.path.insert(0, str(ROOT))

from tests.bodies_support import memory_kib, reset_peak

PACKAGES = ("thallus", "uvicorn", "h11", "starlette", "fastapi", "argon2-cffi", "argon2-cffi-bindings", "httpx")
PASSWORD = "Correct-Horse-Battery-9!"
WRONG_PASSWORD = "Wrong-Horse-Battery-0?"
API_EMAIL = "bench-api@example.com"
SECRET = "bench-login-secret-" + "k" * 29  # 48 characters
APP_ORIGIN = "https://app.example.com"
SETTINGS = {
    "THALLUS_ENV": "test",
    "THALLUS_SECRET_KEY": SECRET,
    "THALLUS_ALLOWED_ORIGINS": APP_ORIGIN,
    "THALLUS_PUBLIC_ORIGIN": "https://api.example.com",
    "THALLUS_TRUSTED_PROXIES": "127.0.0.1",
    "THALLUS_LOG_LEVEL": "WARNING",
}
LOGIN = "/api/v1/auth/login"
REGISTER = "/api/v1/auth/register"
ME = "/api/v1/users/me"
#: what a browser on the allowed origin sends with a sign-in (the login CSRF check reads it)
JSON_HEADERS = {"content-type": "application/json", "origin": APP_ORIGIN}
#: the API-key client cycles over this many addresses: at most a few per minute each, far below 120/minute
API_ADDRESSES = 4096
#: a client gives up on a request after this long (every loop is bounded by a deadline besides)
REQUEST_TIMEOUT = 60.0


# -- addresses ---------------------------------------------------------------------------------


class Addresses:
    """``X-Forwarded-For`` addresses: every login's is new (10.0.0.1, 10.0.0.2, …), the API-key
    client's cycle over :data:`API_ADDRESSES` of 172.16.0.0/12."""

    def __init__(self) -> None:
        self.logins_used = 0
        self._api = itertools.cycle(range(API_ADDRESSES))
        self._lock = threading.Lock()

    def login(self) -> str:
        with self._lock:
            self.logins_used += 1
            n = self.logins_used
        return f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"

    def api(self) -> str:
        with self._lock:
            n = next(self._api)
        return f"172.16.{n >> 8}.{n & 255}"


# -- the server ----------------------------------------------------------------------------------


@dataclass
class LoginTarget(Served):
    """The running ``thallus serve``: its URL, the API key and the users."""

    url: str
    api_key: str
    users: list[str]
    counted = (("hashing_saturated", ("password hashing saturated",)), ("tracebacks", ("Traceback",)))


def start_server(stack: ExitStack, addresses: Addresses, users: int) -> tuple[LoginTarget, dict[str, str]]:
    """A data directory with a user and an API key made by the CLI, ``thallus serve`` on it, then
    ``users`` accounts registered through the API (each client of the throughput runs signs in as its own)."""
    data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="thallus-bench-login-"))
    settings = {**SETTINGS, "THALLUS_DATA_DIR": data_dir}
    env = clean_environment(settings)
    thallus_cli(env, "users", "create", "--email", API_EMAIL, "--password", "-", "--api-access", stdin=PASSWORD + "\n")
    api_key = thallus_cli(env, "keys", "create", "--email", API_EMAIL, "--name", "bench")
    server = serve(stack, settings)
    served = LoginTarget(server.process, url=server.url, api_key=api_key, users=[])
    served.drain(server)
    with httpx.Client(base_url=served.url, timeout=REQUEST_TIMEOUT) as client:
        for index in range(users):
            email = f"bench-login-{index}@example.com"
            response = client.post(
                REGISTER,
                json={"email": email, "password": PASSWORD, "name": f"Bench {index}"},
                headers={**JSON_HEADERS, "x-forwarded-for": addresses.login()},
            )
            if response.status_code != 201:
                raise BenchmarkError(f"register {email}: {response.status_code} {response.text[:300]}")
            served.users.append(email)
        response = client.get(ME, headers={"x-api-key": api_key, "x-forwarded-for": addresses.api()})
        if response.status_code != 200 or response.json().get("email") != API_EMAIL:
            raise BenchmarkError(f"GET {ME} with the key: {response.status_code} {response.text[:300]}")
    return served, settings


# -- figures ---------------------------------------------------------------------------------------


@dataclass
class Requests:
    """What one client, or group of clients, saw: per request its status (or ``error:Type``), when it
    started (seconds after :attr:`origin`) and how long it took."""

    origin: float = field(default_factory=time.perf_counter)
    samples: list[tuple[str, float, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, started: float, response: httpx.Response | None, error: Exception | None = None) -> None:
        """One request started at ``started`` (``perf_counter``) and answered, or failed, now."""
        milliseconds = (time.perf_counter() - started) * 1000
        status = str(response.status_code) if response is not None else f"error:{type(error).__name__}"
        self.samples.append((status, round(started - self.origin, 4), round(milliseconds, 3)))
        if error is not None:
            self.errors.append(f"{type(error).__name__} {str(error)[:200]!r} after {milliseconds:.0f} ms")

    @property
    def statuses(self) -> Counter[str]:
        return Counter(status for status, _, _ in self.samples)

    @property
    def latencies_ms(self) -> list[float]:
        return [milliseconds for _, _, milliseconds in self.samples]

    @property
    def count(self) -> int:
        return len(self.samples)

    def document(self) -> dict[str, Any]:
        latencies = self.latencies_ms
        return {
            "requests": self.count,
            "seconds": self.seconds,
            "statuses": dict(sorted(self.statuses.items())),
            "p50_ms": percentile(latencies, 0.50),
            "p99_ms": percentile(latencies, 0.99),
            "max_ms": max(latencies, default=None),
            "errors": self.errors,
            "samples": [
                {"status": status, "start_s": start, "ms": milliseconds} for status, start, milliseconds in self.samples
            ],
        }


@dataclass
class Throughput:
    round_number: int
    clients: int
    requests: Requests
    cpu: CpuUse

    @property
    def successes(self) -> int:
        return self.requests.statuses["200"]

    @property
    def per_second(self) -> float:
        return self.successes / self.requests.seconds if self.requests.seconds else 0.0

    @property
    def problems(self) -> list[str]:
        found = []
        if unexpected := {status: n for status, n in self.requests.statuses.items() if status != "200"}:
            found.append(f"statuses other than 200: {unexpected}")
        if not self.successes:
            found.append("no login succeeded")
        return found

    def document(self) -> dict[str, Any]:
        return {
            "round": self.round_number,
            "clients": self.clients,
            "valid": not self.problems,
            "problems": self.problems,
            "logins_per_second": self.per_second,
            **self.cpu.document(),
            "server_cpu_ms_per_login": self.cpu.server / self.successes * 1000 if self.successes else None,
            **self.requests.document(),
        }


@dataclass
class Burst:
    round_number: int
    size: int
    requests: Requests
    written_s: list[float | None]
    new_connections: int
    api: Requests
    baseline: Requests
    rss_before_kib: int
    hwm_after_kib: int
    hwm_reset: bool
    sampled_peak_kib: int
    rss_after_kib: int
    rss_samples_kib: list[tuple[float, int]]
    cpu: CpuUse
    saturated_log_lines: int
    settle_seconds: float

    def by_kind(self) -> dict[str, int]:
        """The burst's statuses as the report groups them."""
        kinds = Counter[str]()
        for status, count in self.requests.statuses.items():
            if status in ("401", "429", "503"):
                kinds[status] += count
            elif status.isdigit() and status.startswith("5"):
                kinds["5xx"] += count
            else:
                kinds["other"] += count
        return {kind: kinds[kind] for kind in ("401", "429", "503", "5xx", "other")}

    @property
    def last_written_s(self) -> float | None:
        """When the last request was on the wire (seconds after the release): how simultaneous the burst was."""
        times = [value for value in self.written_s if value is not None]
        return max(times) if times else None

    @property
    def peak_growth_mib(self) -> float:
        return (self.hwm_after_kib - self.rss_before_kib) / 1024

    @property
    def sampled_growth_mib(self) -> float:
        return (self.sampled_peak_kib - self.rss_before_kib) / 1024

    def document(self) -> dict[str, Any]:
        return {
            "round": self.round_number,
            "size": self.size,
            "statuses_by_kind": self.by_kind(),
            "duration_seconds": self.requests.seconds,
            "burst": self.requests.document(),
            "written_after_release_s": self.written_s,
            "last_written_s": self.last_written_s,
            "new_connections": self.new_connections,
            "rss_before_mib": self.rss_before_kib / 1024,
            "hwm_after_mib": self.hwm_after_kib / 1024,
            "hwm_reset_before_burst": self.hwm_reset,
            "peak_growth_mib": self.peak_growth_mib,
            "sampled_peak_growth_mib": self.sampled_growth_mib,
            "rss_after_mib": self.rss_after_kib / 1024,
            "rss_samples_kib": self.rss_samples_kib,
            **self.cpu.document(),
            "hashing_saturated_log_lines": self.saturated_log_lines,
            "settle_seconds": self.settle_seconds,
            "api_key_during_burst": self.api.document(),
            "api_key_baseline": self.baseline.document(),
        }


# -- clients ---------------------------------------------------------------------------------------


def login_body(email: str, password: str) -> bytes:
    return json.dumps({"email": email, "password": password}).encode()


async def throughput(
    served: LoginTarget, addresses: Addresses, clients: int, seconds: float, round_number: int, *, once: bool = False
) -> Throughput:
    """``clients`` closed-loop clients, each signing in as its own user until ``seconds`` have passed
    (``once``: exactly one login each); the run lasts until the last login started is answered."""
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    requests = Requests()
    async with httpx.AsyncClient(base_url=served.url, limits=limits, timeout=REQUEST_TIMEOUT) as client:
        await asyncio.gather(*(client.get("/health") for _ in range(clients)))  # open the connections

        async def sign_in(email: str, deadline: float) -> None:
            body = login_body(email, PASSWORD)
            for sent in itertools.count():
                if (once and sent) or (not once and time.perf_counter() >= deadline):
                    break
                headers = {**JSON_HEADERS, "x-forwarded-for": addresses.login()}
                started = time.perf_counter()
                try:
                    requests.add(started, await client.post(LOGIN, content=body, headers=headers))
                except httpx.HTTPError as exc:
                    requests.add(started, None, exc)

        meter = CpuMeter(served.pid)
        started = requests.origin = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(sign_in(served.users[index], deadline) for index in range(clients)))
        requests.seconds = time.perf_counter() - started
        cpu = meter.stop()
    return Throughput(round_number, clients, requests, cpu)


class ApiKeyClient:
    """One legitimate script: sequential ``GET /api/v1/users/me`` with ``X-API-Key`` on its own thread
    (its own connection; its timing does not wait on the burst's event loop)."""

    def __init__(self, served: LoginTarget, addresses: Addresses) -> None:
        self.served = served
        self.addresses = addresses
        self.client = httpx.Client(base_url=served.url, timeout=REQUEST_TIMEOUT)

    def close(self) -> None:
        self.client.close()

    def _get(self, requests: Requests) -> None:
        headers = {"x-api-key": self.served.api_key, "x-forwarded-for": self.addresses.api()}
        started = time.perf_counter()
        try:
            requests.add(started, self.client.get(ME, headers=headers))
        except httpx.HTTPError as exc:
            requests.add(started, None, exc)

    def warm(self) -> None:
        """One untimed request: the connection is open before anything is timed."""
        self._get(Requests())

    def run(self, stop: threading.Event, limit: float) -> Requests:
        """Requests until ``stop`` is set, at most ``limit`` seconds."""
        requests = Requests()
        while not stop.is_set() and time.perf_counter() - requests.origin < limit:
            self._get(requests)
        requests.seconds = time.perf_counter() - requests.origin
        return requests

    def start(self, stop: threading.Event, limit: float) -> Callable[[], Requests]:
        """:meth:`run` on a thread; the returned function stops and joins it and gives its figures."""
        result: list[Requests] = []
        thread = threading.Thread(target=lambda: result.append(self.run(stop, limit)), name="api-key-client")
        thread.start()

        def join() -> Requests:
            stop.set()
            thread.join()
            return result[0] if result else Requests()

        return join


@dataclass
class Fired:
    """The burst's answers, and when each request was on the wire (httpcore's trace events)."""

    requests: Requests
    #: seconds after the release at which each request's body had been written, in request order
    written_s: list[float | None]
    #: requests that had to open a connection of their own (none if the pre-opened ones were all reused)
    new_connections: int


async def fire_burst(
    served: LoginTarget,
    addresses: Addresses,
    size: int,
    round_number: int,
    timeout: float,
    *,
    at_release: Callable[[], None],
) -> Fired:
    """``size`` wrong-password logins for unknown addresses, each from its own address and on its own
    client with one pre-opened connection (one shared pool would hand them out one at a time),
    released together, ``at_release`` called just before; the duration runs to the last answer."""
    requests = Requests()
    written: list[float | None] = [None] * size
    connected = [False] * size

    def tracer(index: int) -> Callable[[str, dict[str, Any]], Awaitable[None]]:
        async def trace(event: str, info: dict[str, Any]) -> None:
            if event == "http11.send_request_body.complete":
                written[index] = time.perf_counter() - requests.origin
            elif event == "connection.connect_tcp.started":
                connected[index] = True

        return trace

    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    tls = ssl.create_default_context()  # never used on http://, but each client would load the CAs again
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=served.url, limits=limits, timeout=timeout, verify=tls)
            )
            for _ in range(size)
        ]
        await asyncio.gather(*(client.get("/health") for client in clients))  # open the connections
        prepared = [
            client.build_request(
                "POST",
                LOGIN,
                content=login_body(f"burst-{round_number}-{index}@example.com", WRONG_PASSWORD),
                headers={**JSON_HEADERS, "x-forwarded-for": addresses.login()},
                extensions={"trace": tracer(index)},
            )
            for index, client in enumerate(clients)
        ]
        ready, release = asyncio.Event(), asyncio.Event()
        waiting = 0

        async def one(client: httpx.AsyncClient, request: httpx.Request) -> None:
            nonlocal waiting
            waiting += 1
            if waiting == size:
                ready.set()
            await release.wait()
            started = time.perf_counter()
            try:
                requests.add(started, await client.send(request))
            except httpx.HTTPError as exc:
                requests.add(started, None, exc)

        tasks = [asyncio.create_task(one(client, request)) for client, request in zip(clients, prepared, strict=True)]
        await ready.wait()
        at_release()
        requests.origin = time.perf_counter()
        release.set()
        await asyncio.gather(*tasks)
        requests.seconds = time.perf_counter() - requests.origin
    return Fired(requests, [None if value is None else round(value, 4) for value in written], sum(connected))


def burst(
    served: LoginTarget, addresses: Addresses, api: ApiKeyClient, options: argparse.Namespace, round_number: int
) -> Burst:
    """The API-key baseline, then the burst with the API-key client and the RSS sampler running."""
    settle(served)
    api.warm()
    baseline = api.run(threading.Event(), options.seconds)
    settle(served)
    rss_before = memory_kib(served.pid)["VmRSS"]
    hwm_reset = reset_peak(served.pid)
    saturated_before = served.lines["hashing_saturated"]
    stop = threading.Event()
    started: list[tuple[CpuMeter, Callable[[], Requests]]] = []

    def at_release() -> None:  # the API-key client and the CPU clocks start with the burst
        started.append((CpuMeter(served.pid), api.start(stop, options.burst_timeout + 30)))

    api.warm()
    with Sampler(served.pid, 0.02) as sampler:
        try:
            fired = asyncio.run(
                fire_burst(served, addresses, options.burst, round_number, options.burst_timeout, at_release=at_release)
            )
        finally:
            stop.set()
        meter, join = started[0]
        cpu = meter.stop()
        during = join()
    after = memory_kib(served.pid)
    settled = settle(served)
    time.sleep(0.2)  # the drain thread's last lines of the burst
    return Burst(
        round_number=round_number,
        size=options.burst,
        requests=fired.requests,
        written_s=fired.written_s,
        new_connections=fired.new_connections,
        api=during,
        baseline=baseline,
        rss_before_kib=rss_before,
        hwm_after_kib=after["VmHWM"],
        hwm_reset=hwm_reset,
        sampled_peak_kib=max([rss for _, rss in sampler.samples] + [rss_before]),
        rss_after_kib=memory_kib(served.pid)["VmRSS"],
        rss_samples_kib=sampler.samples,
        cpu=cpu,
        saturated_log_lines=served.lines["hashing_saturated"] - saturated_before,
        settle_seconds=settled,
    )


# -- the run ---------------------------------------------------------------------------------------


def report_throughput(item: Throughput) -> None:
    r = item.requests
    progress(
        f"  round {item.round_number} logins, {item.clients:>2} client(s): {item.per_second:5.2f}/s  "
        f"p50 {ms(percentile(r.latencies_ms, 0.5))} ms  p99 {ms(percentile(r.latencies_ms, 0.99))} ms  "
        f"statuses {dict(r.statuses)}" + (f"  INVALID: {'; '.join(item.problems)}" if item.problems else "")
    )


def report_burst(item: Burst) -> None:
    progress(
        f"  round {item.round_number} burst of {item.size}: {item.by_kind()} in {item.requests.seconds:.1f} s, "
        f"peak RSS +{item.peak_growth_mib:,.0f} MiB; API key {item.api.count} requests, "
        f"p99 {ms(percentile(item.api.latencies_ms, 0.99))} ms, "
        f"max {ms(max(item.api.latencies_ms, default=None))} ms "
        f"(baseline p99 {ms(percentile(item.baseline.latencies_ms, 0.99))} ms)"
    )


def run(options: argparse.Namespace) -> dict[str, Any]:
    addresses = Addresses()
    throughputs: list[Throughput] = []
    bursts: list[Burst] = []
    document: dict[str, Any] = {
        "benchmark": "thallus bench_login",
        "environment": environment(PACKAGES),
        "options": {
            "rounds": options.rounds,
            "concurrency": options.concurrency,
            "seconds": options.seconds,
            "burst": options.burst,
            "burst_timeout": options.burst_timeout,
        },
    }
    with ExitStack() as stack:
        progress("creating the API-key user and key (thallus users/keys create), starting thallus serve")
        started = time.monotonic()
        served, settings = start_server(stack, addresses, max(options.concurrency))
        document["source"] = source_of_thallus(settings)
        document["server"] = {"url": served.url, **served.started(settings, started)}
        progress(
            f"  {served.url} pid {served.pid}, thallus from {document['source']['package']}; "
            f"{len(served.users)} users registered"
        )
        api = ApiKeyClient(served, addresses)
        stack.callback(api.close)
        # warm-up (unmeasured): every user signs in once, all at once
        warm = asyncio.run(throughput(served, addresses, len(served.users), 0.0, 0, once=True))
        progress(f"  warm-up: {warm.requests.count} logins, statuses {dict(warm.requests.statuses)}")
        document["warmup"] = warm.document()
        for round_number in range(1, options.rounds + 1):
            for clients in options.concurrency:
                settle(served)
                item = asyncio.run(throughput(served, addresses, clients, options.seconds, round_number))
                report_throughput(item)
                throughputs.append(item)
            if options.burst:
                item_burst = burst(served, addresses, api, options, round_number)
                report_burst(item_burst)
                bursts.append(item_burst)
        document["server"] |= {**served.stopped(), "login_addresses_used": addresses.logins_used}
    document["throughput"] = [item.document() for item in throughputs]
    document["bursts"] = [item.document() for item in bursts]
    document["spread"] = spread(document)
    return document


# -- reporting -------------------------------------------------------------------------------------


def spread(document: Mapping[str, Any]) -> dict[str, Any]:
    """Min, median and max over the rounds of every figure (throughput over its valid rounds only)."""
    result: dict[str, Any] = {}
    for clients in document["options"]["concurrency"]:
        runs = [run for run in document["throughput"] if run["clients"] == clients and run["valid"]]
        label = f"{clients} client" + ("s" if clients > 1 else "")
        for key, name in (("logins_per_second", "logins/s"), ("p50_ms", "login p50 ms"), ("p99_ms", "login p99 ms")):
            result[f"{name}, {label}"] = spread_of([run[key] for run in runs])
    bursts = document["bursts"]
    figures: dict[str, Callable[[dict[str, Any]], float | None]] = {
        "burst 401": lambda item: item["statuses_by_kind"]["401"],
        "burst 429": lambda item: item["statuses_by_kind"]["429"],
        "burst 503": lambda item: item["statuses_by_kind"]["503"],
        "burst other 5xx": lambda item: item["statuses_by_kind"]["5xx"],
        "burst other": lambda item: item["statuses_by_kind"]["other"],
        "burst sent in ms": lambda item: item["last_written_s"] * 1000 if item["last_written_s"] is not None else None,
        "burst duration s": lambda item: item["duration_seconds"],
        "burst peak RSS growth MiB": lambda item: item["peak_growth_mib"],
        "burst sampled RSS growth MiB": lambda item: item["sampled_peak_growth_mib"],
        "API key requests during burst": lambda item: item["api_key_during_burst"]["requests"],
        "API key p50 ms during burst": lambda item: item["api_key_during_burst"]["p50_ms"],
        "API key p99 ms during burst": lambda item: item["api_key_during_burst"]["p99_ms"],
        "API key max ms during burst": lambda item: item["api_key_during_burst"]["max_ms"],
        "API key p50 ms baseline": lambda item: item["api_key_baseline"]["p50_ms"],
        "API key p99 ms baseline": lambda item: item["api_key_baseline"]["p99_ms"],
        "API key max ms baseline": lambda item: item["api_key_baseline"]["max_ms"],
    }
    for name, figure in figures.items():
        result[name] = spread_of([figure(item) for item in bursts])
    return result


def _share(seconds: float, wall: float) -> str:
    """CPU seconds over a wall-clock stretch, as a share of one CPU."""
    return f"{seconds / wall * 100:.0f} %" if wall else "-"


def _statuses(statuses: Mapping[str, int]) -> str:
    return " ".join(f"{status}×{count}" for status, count in sorted(statuses.items()))


def render(document: dict[str, Any]) -> str:
    options, source = document["options"], document["source"]
    lines = [
        *describe(document["environment"]),
        describe_import(source),
        "server: thallus serve, one uvicorn worker on 127.0.0.1, "
        + ", ".join(f"{name}={value}" for name, value in SETTINGS.items() if name != "THALLUS_SECRET_KEY")
        + ", a 48-character secret, SQLite in a temporary THALLUS_DATA_DIR; THALLUS_ARGON2_* and "
        "THALLUS_PASSWORD_HASH_* not set (production cost; the cap's defaults where the code has one)",
        f"{options['rounds']} round(s); throughput: {', '.join(map(str, options['concurrency']))} closed-loop "
        f"client(s) × {options['seconds']:g} s, one user each, a new X-Forwarded-For address per login; "
        f"then the API-key client alone for {options['seconds']:g} s, then a burst of {options['burst']} "
        "wrong-password logins released at once with the API-key client running",
        "",
        "Logins (every round; p99 is the nearest rank, so with fewer than 100 logins it is the slowest)",
    ]
    rows: list[tuple[str, ...]] = []
    for run in document["throughput"]:
        rows.append(
            (
                str(run["round"]),
                str(run["clients"]),
                number(run["logins_per_second"], ".2f") if run["valid"] else "INVALID",
                str(run["requests"]),
                number(run["p50_ms"], ",.0f"),
                number(run["p99_ms"], ",.0f"),
                number(run["max_ms"], ",.0f"),
                number(run["server_cpu_ms_per_login"], ",.0f"),
                _share(run["server_cpu_seconds"], run["wall_seconds"]),
                _share(run["other_cpu_seconds"], run["wall_seconds"]),
                _statuses(run["statuses"]),
            )
        )
    header: tuple[str, ...] = (
        "round",
        "clients",
        "logins/s",
        "logins",
        "p50 ms",
        "p99 ms",
        "max ms",
        "CPU ms/login",
        "server CPU",
        "other CPU",
        "statuses",
    )
    lines += text_table(header, rows, align="rrrrrrrrrrl")
    if document["bursts"]:
        lines += ["", f"Burst of {options['burst']} concurrent wrong-password logins (unknown addresses)"]
        rows = []
        for item in document["bursts"]:
            kinds = item["statuses_by_kind"]
            rows.append(
                (
                    str(item["round"]),
                    *(str(kinds[kind]) for kind in ("401", "429", "503", "5xx", "other")),
                    number(item["last_written_s"] * 1000 if item["last_written_s"] is not None else None, ",.0f"),
                    number(item["duration_seconds"], ".1f"),
                    number(item["rss_before_mib"], ",.0f"),
                    number(item["peak_growth_mib"], ",.0f") + ("" if item["hwm_reset_before_burst"] else "*"),
                    number(item["sampled_peak_growth_mib"], ",.0f"),
                    _share(item["server_cpu_seconds"], item["wall_seconds"]),
                    _share(item["other_cpu_seconds"], item["wall_seconds"]),
                )
            )
        header = (
            "round",
            "401",
            "429",
            "503",
            "5xx",
            "other",
            "sent in ms",
            "burst s",
            "RSS MiB",
            "peak +MiB",
            "sampled +MiB",
            "server CPU",
            "other CPU",
        )
        lines += text_table(header, rows, align="r" * len(header))
        lines += [
            "",
            "The API-key client (sequential GET /api/v1/users/me), during each burst and just before it alone",
        ]
        rows = []
        for item in document["bursts"]:
            api, base = item["api_key_during_burst"], item["api_key_baseline"]
            rows.append(
                (
                    str(item["round"]),
                    str(api["requests"]),
                    number(api["p50_ms"]),
                    number(api["p99_ms"]),
                    number(api["max_ms"]),
                    str(sum(count for status, count in api["statuses"].items() if status != "200")),
                    str(base["requests"]),
                    number(base["p50_ms"]),
                    number(base["p99_ms"]),
                    number(base["max_ms"]),
                    str(sum(count for status, count in base["statuses"].items() if status != "200")),
                )
            )
        header = (
            "round",
            "burst: requests",
            "p50 ms",
            "p99 ms",
            "max ms",
            "non-200",
            "alone: requests",
            "p50 ms",
            "p99 ms",
            "max ms",
            "non-200",
        )
        lines += text_table(header, rows, align="r" * len(header))
        lines.append(
            "sent in ms: when the last request of the burst had been written, after the release; burst s: until "
            "the last answer. RSS MiB: VmRSS before the burst; peak +MiB: VmHWM after it minus that, the peak "
            "reset first (clear_refs; * where it could not be); sampled +MiB: the highest VmRSS read every "
            "20 ms. CPU columns, here and above: share of one CPU over the run; other = the machine's busy "
            "time beyond the server and this client (other work on the machine)."
        )
    lines += spread_table(
        document["spread"],
        lambda name, values: ",.2f" if "logins/s" in name else ",.1f" if values["max"] < 1000 else ",.0f",
    )
    lines += ["", *notes(document)]
    return "\n".join(lines)


def notes(document: dict[str, Any]) -> list[str]:
    found = []
    server = document["server"]
    for run in document["throughput"]:
        if not run["valid"]:
            found.append(f"INVALID round {run['round']}, {run['clients']} client(s): " + "; ".join(run["problems"]))
    warm = document["warmup"]
    if not warm["valid"]:
        found.append("warm-up: " + "; ".join(warm["problems"]))
    for item in document["bursts"]:
        if not item["hwm_reset_before_burst"]:
            found.append(
                f"* round {item['round']}: /proc/<pid>/clear_refs could not be written, so VmHWM is the peak "
                "since the server started, reported relative to the RSS before the burst"
            )
        other = {s: n for s, n in item["burst"]["statuses"].items() if s not in ("401", "503")}
        if other:
            errors = item["burst"]["errors"]
            found.append(
                f"burst round {item['round']}: statuses besides 401/503: {other}"
                + (f"; {len(errors)} transport error(s), first: {'; '.join(errors[:3])}" if errors else "")
            )
        key = {s: n for s, n in item["api_key_during_burst"]["statuses"].items() if s != "200"}
        if key:
            found.append(f"API-key client during the burst of round {item['round']}: not 200: {key}")
        if item["settle_seconds"] > 25:
            found.append(
                f"round {item['round']}: the server was still busy {item['settle_seconds']:.0f} s after the burst"
            )
    busy = [
        run["other_cpu_share"] for run in [*document["throughput"], *document["bursts"]] if run["other_cpu_share"] > 0.2
    ]
    if busy:
        found.append(
            f"other work took more than 20 % of a CPU in {len(busy)} run(s) (up to {max(busy) * 100:.0f} %): "
            "the server and the client shared the machine with it, so compare rounds of one run, or rerun"
        )
    if lines := server.get("log_lines"):
        found.append(f"server log: {lines}")
    if server.get("output"):
        found.append("server wrote (last lines): " + " | ".join(line[:200] for line in server["output"][-3:]))
    return found


# -- entry point -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every part (default 3); each is printed")
    parser.add_argument(
        "--concurrency",
        default="1,4,16",
        help="comma-separated numbers of concurrent login clients; 1 is the sequential run (default 1,4,16)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=5.0,
        help="seconds of each throughput run and of the API-key baseline (default 5)",
    )
    parser.add_argument("--burst", type=int, default=150, help="concurrent logins of the burst (default 150; 0: none)")
    parser.add_argument(
        "--burst-timeout",
        type=float,
        default=120.0,
        help="seconds a burst request may take before the client gives up (default 120)",
    )
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write every raw figure to PATH as JSON")
    options = parser.parse_args(argv)
    try:
        options.concurrency = sorted({int(part) for part in options.concurrency.split(",") if part.strip()})
    except ValueError:
        parser.error("--concurrency takes comma-separated whole numbers")
    if not options.concurrency or options.concurrency[0] < 1 or options.concurrency[-1] > 256:
        parser.error("--concurrency needs numbers from 1 to 256")
    if options.rounds < 1 or options.seconds <= 0 or not 0 <= options.burst <= 1000 or options.burst_timeout <= 0:
        parser.error("--rounds must be >= 1, --seconds and --burst-timeout > 0, --burst 0–1000")
    return options


def main(argv: Sequence[str] | None = None) -> None:
    options = parse_args(argv)
    conclude(
        "bench_login",
        lambda: run(options),
        render,
        json_path=options.json,
        invalid=lambda document: any(not item["valid"] for item in document["throughput"]),
    )


if __name__ == "__main__":
    main()
