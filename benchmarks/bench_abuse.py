"""Abuse against one real ``thallus serve``: oversized bodies, and slow clients holding sockets.

Against one ``thallus serve`` on 127.0.0.1 (``tests.server.running_server``, one uvicorn worker, so
the server is the ``Popen``'s own process; ``THALLUS_ENV=production``, a 48-character secret,
``THALLUS_TRUSTED_PROXIES=127.0.0.1``, ``THALLUS_LOG_LEVEL=WARNING``, SQLite in a temporary data
directory; the body limit and the connection bounds at their defaults unless an option sets them):

* **bodies** — per round, one 200 MiB JSON body to ``POST /api/v1/auth/login`` with a declared
  ``Content-Length``, one chunked, then four of each at once. Each body is generated 64 KiB at a
  time and written by a thread while the answer is read as soon as it arrives. Reported: the
  statuses, how long until each answer was complete, how much of the body had been written by then,
  and the server's memory: ``VmRSS`` before, the peak (``VmHWM`` after ``/proc/<pid>/clear_refs``
  reset it, and the highest ``VmRSS`` sampled every 5 ms) and ``VmRSS`` a second after the answers.
  Before the body limit (quoted): one body took the RSS from 118 to 519 MiB before a 400; four at
  once peaked at 2.7 GiB and held 1.7 GiB;
* **slowloris** — ``--sockets`` sockets that each send a partial request head, then one more header
  byte every ``--trickle`` seconds, reopened whenever the server closes them, for ``--seconds``; the
  header deadline (``THALLUS_HEADER_TIMEOUT``, 10 s) should close each about 10 s after it opened;
* **stalled-body** — the same number of sockets each sending a whole head with ``Content-Length:
  100`` and 10 bytes of body, then nothing: the body timeout (``THALLUS_BODY_TIMEOUT``, 30 s)
  answers 408, the keep-alive idle timeout (5 s) then closes;
* **held** — two ways past those bounds, half the sockets each: *after-answer* declares a 200 MiB
  body (refused at once, 413) and then trickles body bytes; *slow-body* declares 100 bytes and
  trickles one byte every ``--trickle`` seconds, each within the body timeout.

During each socket attack (and alone, before them, for ``--baseline`` seconds) a client in a process
of its own sends ``GET /health`` on a new connection ``--health-rate`` times a second and records
each latency from its scheduled start. Reported: /health's p50/p99/max and count; per kind of socket how many were
opened, answered (and with what), closed by the server, how long from open to close (median and max),
still open at the end and the oldest of them; the peak open at once (this client's count and the
server's open file descriptors). Every round is printed, and the spread over the rounds.
Run ``.venv/bin/python benchmarks/bench_abuse.py --help``.
"""

from __future__ import annotations

import argparse
import errno
import heapq
import itertools
import json
import resource
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import ROOT, conclude, describe, environment, progress, text_table
from figures import median, ms, number, percentile, spread_of, spread_table
from served import (
    CpuMeter,
    Sampler,
    Served,
    describe_import,
    machine_busy_seconds,
    open_fds,
    serve,
    settle,
    source_of_thallus,
)

if str(ROOT) not in sys.path:  # the body and the memory readings are shared with tests/test_bodies_served.py
    sys.path.insert(0, str(ROOT))

from tests.bodies_support import APP_ORIGIN, body_head, memory_kib, read_response, reset_peak, send_body

PACKAGES = ("thallus", "uvicorn", "h11", "starlette", "fastapi")
SECRET = "bench-abuse-secret-" + "k" * 29  # 48 characters
SETTINGS = {
    "THALLUS_ENV": "production",
    "THALLUS_SECRET_KEY": SECRET,
    "THALLUS_ALLOWED_ORIGINS": APP_ORIGIN,
    "THALLUS_PUBLIC_ORIGIN": "https://api.example.com",
    "THALLUS_TRUSTED_PROXIES": "127.0.0.1",
    "THALLUS_LOG_LEVEL": "WARNING",
}
#: the defaults of the bounds measured here (src/thallus/settings.py), for the report when no option sets them
DEFAULT_BOUNDS = {"max_body_bytes": 1024 * 1024, "header_timeout": 10.0, "body_timeout": 30.0, "keep_alive": 5.0}
LOGIN = "/api/v1/auth/login"
HOST = "127.0.0.1"
MiB = 1024 * 1024
PARTS = ("bodies", "slowloris", "stalled-body", "held")
#: the figures quoted from before the body limit (MiB): one body's RSS before and peak; four at once, peak and held
BEFORE_FIX = {"one_before_mib": 118, "one_peak_mib": 519, "four_peak_mib": 2.7 * 1024, "four_held_mib": 1.7 * 1024}
#: /health p99 the slow-socket attacks are judged against
HEALTH_P99_TARGET_MS = 50.0
#: a client gives up on one answer after this long (every loop also ends at a deadline)
ANSWER_TIMEOUT = 120.0


# -- the server ------------------------------------------------------------------------------------


@dataclass
class AbuseTarget(Served):
    """The running ``thallus serve`` and its port."""

    port: int
    counted = (
        ("tracebacks", ("Traceback",)),
        ("connections_refused_at_the_cap", ("connection refused",)),
        ("warnings_or_errors", ("WARNING", "ERROR")),
    )


def server_settings(options: argparse.Namespace, data_dir: str) -> dict[str, str]:
    settings = {**SETTINGS, "THALLUS_DATA_DIR": data_dir}
    if options.header_timeout is not None:
        settings["THALLUS_HEADER_TIMEOUT"] = f"{options.header_timeout:g}"
    if options.body_timeout is not None:
        settings["THALLUS_BODY_TIMEOUT"] = f"{options.body_timeout:g}"
    return settings


def start_server(stack: ExitStack, options: argparse.Namespace) -> tuple[AbuseTarget, dict[str, str]]:
    data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="thallus-bench-abuse-"))
    settings = server_settings(options, data_dir)
    server = serve(stack, settings)
    served = AbuseTarget(server.process, port=server.port)
    served.drain(server)
    return served, settings


def raise_fd_limit(needed: int) -> dict[str, int]:
    """Raise this process's soft ``RLIMIT_NOFILE`` (the server, started after, inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    now, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {"soft_before": soft, "soft": now, "hard": hard}


# -- figures ---------------------------------------------------------------------------------------


def status_of(data: bytes) -> str | None:
    """The status code of the response ``data`` begins with, if it does."""
    if not data.startswith(b"HTTP/1."):
        return None
    parts = data.split(b" ", 2)
    return parts[1].decode("latin-1") if len(parts) > 1 else None


def address(n: int) -> str:
    """A distinct ``X-Forwarded-For`` address per request, so the per-address limits never refuse one."""
    return f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


class Addresses:
    def __init__(self) -> None:
        self._next = itertools.count(1)
        self._lock = threading.Lock()

    def __call__(self) -> str:
        with self._lock:
            return address(next(self._next))


# -- bodies ----------------------------------------------------------------------------------------


@dataclass
class BodyAnswer:
    status: str
    seconds: float | None
    sent_bytes: int
    error: str | None

    def document(self) -> dict[str, Any]:
        return {"status": self.status, "seconds": self.seconds, "sent_bytes": self.sent_bytes, "error": self.error}


def body_answer(port: int, total: int, framing: str, forwarded: str, start: threading.Barrier | None) -> BodyAnswer:
    """``total`` body bytes to the login route, written while the answer is read (:func:`send_body`)."""
    exchange = send_body(port, body_head(LOGIN, total, framing, forwarded), total, framing, ANSWER_TIMEOUT, start)
    status = status_of(exchange.raw)
    problems = [f"sending: {type(exchange.send_error).__name__}"] if exchange.send_error is not None else []
    if exchange.early and status is None:
        problems.append(exchange.early)
    seconds = exchange.seconds if status else None
    return BodyAnswer(status or "none", seconds, exchange.sent, "; ".join(problems) or None)


@dataclass
class BodyRun:
    round_number: int
    framing: str
    count: int
    size: int
    answers: list[BodyAnswer]
    rss_before_kib: int
    hwm_after_kib: int
    hwm_reset: bool
    sampled_peak_kib: int
    rss_after_kib: int
    settle_seconds: float

    @property
    def peak_kib(self) -> int:
        return max(self.sampled_peak_kib, self.hwm_after_kib if self.hwm_reset else 0, self.rss_before_kib)

    @property
    def statuses(self) -> Counter[str]:
        return Counter(answer.status for answer in self.answers)

    def document(self) -> dict[str, Any]:
        times = [answer.seconds for answer in self.answers if answer.seconds is not None]
        return {
            "round": self.round_number,
            "framing": self.framing,
            "count": self.count,
            "body_bytes": self.size,
            "statuses": dict(sorted(self.statuses.items())),
            "answers": [answer.document() for answer in self.answers],
            "answer_ms_max": max(times) * 1000 if times else None,
            "answer_ms_median": statistics.median(times) * 1000 if times else None,
            "sent_mib_max": max(answer.sent_bytes for answer in self.answers) / MiB,
            "rss_before_mib": self.rss_before_kib / 1024,
            "hwm_after_mib": self.hwm_after_kib / 1024,
            "hwm_reset": self.hwm_reset,
            "sampled_peak_mib": self.sampled_peak_kib / 1024,
            "peak_mib": self.peak_kib / 1024,
            "peak_growth_mib": (self.peak_kib - self.rss_before_kib) / 1024,
            "rss_after_mib": self.rss_after_kib / 1024,
            "after_growth_mib": (self.rss_after_kib - self.rss_before_kib) / 1024,
            "settle_seconds": self.settle_seconds,
        }


def body_run(
    served: AbuseTarget, addresses: Addresses, *, framing: str, count: int, size: int, round_number: int
) -> BodyRun:
    settled = settle(served)
    rss_before = memory_kib(served.pid)["VmRSS"]
    hwm_reset = reset_peak(served.pid)
    start = threading.Barrier(count) if count > 1 else None
    forwarded = [addresses() for _ in range(count)]
    with Sampler(served.pid, 0.005) as sampler, ThreadPoolExecutor(max_workers=count) as pool:
        answers = list(pool.map(lambda xff: body_answer(served.port, size, framing, xff, start), forwarded))
    hwm_after = memory_kib(served.pid)["VmHWM"]
    time.sleep(1.0)
    return BodyRun(
        round_number=round_number,
        framing=framing,
        count=count,
        size=size,
        answers=answers,
        rss_before_kib=rss_before,
        hwm_after_kib=hwm_after,
        hwm_reset=hwm_reset,
        sampled_peak_kib=max(sampler.peak_rss_kib, rss_before),
        rss_after_kib=memory_kib(served.pid)["VmRSS"],
        settle_seconds=settled,
    )


# -- the /health client ----------------------------------------------------------------------------

HEALTH_REQUEST = b"GET /health HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n"


@dataclass
class Health:
    """``GET /health`` answers: status, scheduled start (seconds after the first) and latency, ms."""

    samples: list[tuple[str, float, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def latencies_ms(self) -> list[float]:
        return [milliseconds for _, _, milliseconds in self.samples]

    def document(self) -> dict[str, Any]:
        latencies = self.latencies_ms
        return {
            "requests": len(self.samples),
            "statuses": dict(sorted(Counter(status for status, _, _ in self.samples).items())),
            "p50_ms": percentile(latencies, 0.50),
            "p99_ms": percentile(latencies, 0.99),
            "max_ms": max(latencies, default=None),
            "max_at_s": max(self.samples, key=lambda sample: sample[2])[1] if self.samples else None,
            "errors": self.errors[:20],
            "error_count": len(self.errors),
            "samples": [{"status": s, "at_s": round(at, 3), "ms": round(ms, 3)} for s, at, ms in self.samples],
        }


def health_once(port: int, timeout: float) -> str:
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(HEALTH_REQUEST)
        raw, early = read_response(sock, timeout)
    status = status_of(raw)
    if status is None:
        raise OSError(early or "no status line")
    return status


def probe_health(port: int, rate: float, seconds: float, stop: threading.Event) -> Health:
    """``GET /health`` on a new connection every 1/``rate`` s for ``seconds`` (or until ``stop``); each
    latency counts from its scheduled start, so a stall delays, and is charged to, the ones after it."""
    health = Health()
    interval = 1.0 / rate
    origin = time.perf_counter()
    for n in itertools.count():
        scheduled = origin + n * interval
        if scheduled - origin >= seconds or stop.is_set():
            break
        pause = scheduled - time.perf_counter()
        if pause > 0 and stop.wait(pause):
            break
        try:
            status = health_once(port, 10.0)
        except OSError as exc:
            status = "error"
            health.errors.append(f"{type(exc).__name__}: {exc}"[:200])
        health.samples.append((status, scheduled - origin, (time.perf_counter() - scheduled) * 1000))
    return health


def start_health_client(port: int, rate: float, until: float) -> subprocess.Popen[str]:
    """:func:`probe_health` in a process of its own until ``until`` (``time.time()``), so that this
    process's socket loop never delays it (one interpreter lock for both would)."""
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--health-client", f"{port}:{rate}:{until}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def collect_health(process: subprocess.Popen[str], origin: float, timeout: float) -> Health:
    """The health client's answers, their start times made relative to ``origin`` (``time.time()``)."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    try:
        found = json.loads(out)
    except ValueError:
        return Health(errors=[f"the health client failed ({process.returncode}): {err.strip()[-300:]}"])
    shift = found["origin"] - origin
    samples = [(status, at + shift, milliseconds) for status, at, milliseconds in found["samples"]]
    return Health(samples, found["errors"])


def health_client(spec: str) -> None:
    """The ``--health-client PORT:RATE:UNTIL`` process: probe, then print the answers as JSON."""
    port, rate, until = spec.split(":")
    origin = time.time()
    health = probe_health(int(port), float(rate), float(until) - origin, threading.Event())
    print(json.dumps({"origin": origin, "samples": health.samples, "errors": health.errors}))


# -- slow sockets ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """One way of holding a socket: the bytes sent at once, the byte trickled after (or none), and
    the bound that should close it."""

    name: str
    head: Callable[[str], bytes]
    trickle: bytes | None
    bound: str


def slowloris_head(forwarded: str) -> bytes:
    return f"GET /health HTTP/1.1\r\nHost: api.example.com\r\nX-Forwarded-For: {forwarded}\r\nX-Slow: ".encode()


def declared_head(length: int, body: bytes) -> Callable[[str], bytes]:
    def head(forwarded: str) -> bytes:
        return (
            f"POST {LOGIN} HTTP/1.1\r\nHost: api.example.com\r\nContent-Type: application/json\r\n"
            f"Origin: {APP_ORIGIN}\r\nX-Forwarded-For: {forwarded}\r\nContent-Length: {length}\r\n\r\n"
        ).encode() + body

    return head


SLOWLORIS = Kind("slowloris", slowloris_head, b"a", "header deadline")
STALLED_BODY = Kind("stalled-body", declared_head(100, b'{"email":"'), None, "body timeout, then keep-alive idle")
AFTER_ANSWER = Kind("after-answer", declared_head(200 * MiB, b""), b"a", "none known")
SLOW_BODY = Kind("slow-body", declared_head(100, b'{"email":"'), b"a", "none known")
ATTACKS: dict[str, tuple[Kind, ...]] = {
    "slowloris": (SLOWLORIS,),
    "stalled-body": (STALLED_BODY,),
    "held": (AFTER_ANSWER, SLOW_BODY),
}


def expected_close(kind: Kind, bounds: Mapping[str, float]) -> float | None:
    """Seconds after opening by which the server should have closed a socket of ``kind``, if any bound applies."""
    if kind is SLOWLORIS:
        return bounds["header_timeout"]
    if kind is STALLED_BODY:
        return bounds["body_timeout"] + bounds["keep_alive"]
    return None


@dataclass
class Slot:
    kind: Kind
    sock: socket.socket
    opened: float
    pending: bytes
    connected: bool = False
    answered: float | None = None
    status: str | None = None
    closed: bool = False


@dataclass
class Closed:
    kind: str
    open_seconds: float
    answer_seconds: float | None
    status: str | None
    how: str


class SlowSockets:
    """``count`` sockets on one ``selectors`` loop (no thread per socket), each of ``kinds`` in turn,
    reopened as soon as the server closes one, until ``seconds`` have passed."""

    def __init__(self, port: int, kinds: Sequence[Kind], count: int, interval: float, addresses: Addresses) -> None:
        self.port = port
        self.kinds = kinds
        self.count = count
        self.interval = interval
        self.addresses = addresses
        self.selector = selectors.DefaultSelector()
        self.due: list[tuple[float, int, Slot]] = []
        self.retries: list[tuple[float, int, Kind]] = []
        self.sequence = itertools.count()
        self.open_now = 0
        self.peak_open = 0
        self.opened: Counter[str] = Counter()
        self.connect_failures: Counter[str] = Counter()
        self.closed: list[Closed] = []
        self.origin = time.monotonic()
        self.deadline = self.origin

    def _open(self, kind: Kind) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex((HOST, self.port))
        self.opened[kind.name] += 1
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self.connect_failures[errno.errorcode.get(code, str(code))] += 1
            if time.monotonic() < self.deadline:
                heapq.heappush(self.retries, (time.monotonic() + 0.1, next(self.sequence), kind))
            return
        slot = Slot(kind, sock, time.monotonic(), kind.head(self.addresses()))
        self.selector.register(sock, selectors.EVENT_WRITE, slot)

    def _close(self, slot: Slot, how: str) -> None:
        if slot.closed:
            return
        now = time.monotonic()
        slot.closed = True
        self.selector.unregister(slot.sock)
        slot.sock.close()
        if slot.connected:
            self.open_now -= 1
        self.closed.append(
            Closed(
                slot.kind.name,
                now - slot.opened,
                None if slot.answered is None else slot.answered - slot.opened,
                slot.status,
                how,
            )
        )
        if now < self.deadline:
            self._open(slot.kind)

    def _write(self, slot: Slot, data: bytes) -> None:
        try:
            written = slot.sock.send(data)
        except BlockingIOError:
            written = 0
        except OSError:
            self._read(slot)  # an answer that came with the close
            self._close(slot, "send failed")
            return
        slot.pending = data[written:]

    def _read(self, slot: Slot) -> None:
        try:
            data = slot.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self._close(slot, "reset")
            return
        if not data:
            self._close(slot, "closed")
            return
        if slot.answered is None:
            slot.answered = time.monotonic()
            slot.status = status_of(data) or "unparsed"

    def _ready(self, slot: Slot) -> None:
        if slot.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self.connect_failures["connect"] += 1
            self._close(slot, "connect failed")
            return
        slot.connected = True
        self.open_now += 1
        self.peak_open = max(self.peak_open, self.open_now)
        self.selector.modify(slot.sock, selectors.EVENT_READ, slot)
        self._write(slot, slot.pending)
        if not slot.closed and (slot.kind.trickle is not None or slot.pending):
            heapq.heappush(self.due, (time.monotonic() + self.interval, next(self.sequence), slot))

    def run(self, seconds: float) -> dict[str, Any]:
        self.origin = time.monotonic()
        self.deadline = self.origin + seconds
        for index in range(self.count):
            self._open(self.kinds[index % len(self.kinds)])
        while (now := time.monotonic()) < self.deadline:
            soonest = min([self.deadline] + [queue[0][0] for queue in (self.due, self.retries) if queue])
            timeout = soonest - now
            for key, _mask in self.selector.select(max(0.0, min(timeout, 0.2))):
                slot: Slot = key.data
                if slot.closed:
                    continue
                if slot.connected:
                    self._read(slot)
                else:
                    self._ready(slot)
            now = time.monotonic()
            while self.due and self.due[0][0] <= now:
                _, _, slot = heapq.heappop(self.due)
                if slot.closed:
                    continue
                self._write(slot, slot.pending or (slot.kind.trickle or b""))
                if not slot.closed and (slot.kind.trickle is not None or slot.pending):
                    heapq.heappush(self.due, (now + self.interval, next(self.sequence), slot))
            while self.retries and self.retries[0][0] <= now:  # a connect that failed at once, again
                self._open(heapq.heappop(self.retries)[2])
        return self._finish()

    def _finish(self) -> dict[str, Any]:
        now = time.monotonic()
        still: list[Slot] = [key.data for key in self.selector.get_map().values()]
        for slot in still:
            self.selector.unregister(slot.sock)
            slot.sock.close()
        self.selector.close()
        kinds: dict[str, Any] = {}
        for kind in dict.fromkeys(self.kinds):
            closed = [item for item in self.closed if item.kind == kind.name]
            by_server = [item for item in closed if item.how != "connect failed"]
            open_slots = [slot for slot in still if slot.kind is kind and slot.connected]
            answered = Counter(item.status or "none" for item in by_server)
            answered_open = Counter(slot.status for slot in open_slots if slot.status is not None)
            waits = [item.answer_seconds for item in by_server if item.answer_seconds is not None]
            waits += [slot.answered - slot.opened for slot in open_slots if slot.answered is not None]
            durations = [item.open_seconds for item in by_server]
            ages = [now - slot.opened for slot in open_slots]
            kinds[kind.name] = {
                "bound": kind.bound,
                "opened": self.opened[kind.name],
                "closed_by_server": len(by_server),
                "closed_statuses": dict(sorted(answered.items())),
                "closed_how": dict(sorted(Counter(item.how for item in by_server).items())),
                "close_seconds_min": min(durations, default=None),
                "close_seconds_median": median(durations),
                "close_seconds_max": max(durations, default=None),
                "answer_seconds_median": median(waits),
                "answer_seconds_max": max(waits, default=None),
                "open_at_end": len(open_slots),
                "open_at_end_answered": dict(sorted(answered_open.items())),
                "oldest_open_seconds": max(ages, default=None),
                "open_ages_seconds": sorted(round(age, 2) for age in ages),
                "close_seconds": sorted(round(value, 3) for value in durations),
            }
        return {
            "peak_open": self.peak_open,
            "connect_failures": dict(self.connect_failures),
            "kinds": kinds,
        }


@dataclass
class AttackRun:
    round_number: int
    attack: str
    document: dict[str, Any]


def attack_run(
    served: AbuseTarget,
    addresses: Addresses,
    options: argparse.Namespace,
    *,
    name: str,
    round_number: int,
    bounds: Mapping[str, float],
    fds_idle: int,
) -> AttackRun:
    kinds = ATTACKS[name]
    settle(served, fds=fds_idle + 5)
    engine = SlowSockets(served.port, kinds, options.sockets, options.trickle, addresses)
    meter = CpuMeter(served.pid)
    origin = time.time()
    prober = start_health_client(served.port, options.health_rate, origin + options.seconds)
    try:
        with Sampler(served.pid, 0.25, fds=True) as sampler:
            sockets = engine.run(options.seconds)
    finally:
        health = collect_health(prober, origin, 30.0)
    cpu = meter.stop()
    settled = settle(served, fds=fds_idle + 5)
    for kind in kinds:
        figures = sockets["kinds"][kind.name]
        expected = expected_close(kind, bounds)
        figures["expected_close_seconds"] = expected
        figures["overdue_at_end"] = (
            None if expected is None else sum(age > expected + 2.0 for age in figures["open_ages_seconds"])
        )
    document = {
        "round": round_number,
        "attack": name,
        "sockets": options.sockets,
        "seconds": options.seconds,
        "wall_seconds": cpu.wall,
        "server_cpu_share": cpu.server / cpu.wall if cpu.wall else None,
        "client_cpu_share": cpu.client / cpu.wall if cpu.wall else None,
        "other_cpu_share": cpu.other / cpu.wall if cpu.wall else None,
        "server_peak_rss_mib": sampler.peak_rss_kib / 1024,
        "server_peak_fds": sampler.peak_fds,
        "server_fds_idle": fds_idle,
        "server_fds_after": open_fds(served.pid),
        "settle_seconds": settled,
        **sockets,
        "health": health.document(),
    }
    return AttackRun(round_number, name, document)


# -- the run ---------------------------------------------------------------------------------------


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def run(options: argparse.Namespace) -> dict[str, Any]:
    addresses = Addresses()
    limits = raise_fd_limit(options.sockets + 256)
    bounds = {
        "max_body_bytes": float(DEFAULT_BOUNDS["max_body_bytes"]),
        "header_timeout": options.header_timeout or DEFAULT_BOUNDS["header_timeout"],
        "body_timeout": options.body_timeout or DEFAULT_BOUNDS["body_timeout"],
        "keep_alive": DEFAULT_BOUNDS["keep_alive"],
    }
    document: dict[str, Any] = {
        "benchmark": "thallus bench_abuse",
        "environment": environment(PACKAGES),
        "options": {
            "parts": options.parts,
            "rounds": options.rounds,
            "socket_rounds": options.socket_rounds,
            "body_bytes": options.body_bytes,
            "sockets": options.sockets,
            "seconds": options.seconds,
            "trickle": options.trickle,
            "baseline": options.baseline,
            "health_rate": options.health_rate,
            "header_timeout": options.header_timeout,
            "body_timeout": options.body_timeout,
        },
        "bounds": bounds,
        "fd_limit": limits,
        "before_fix_quoted": BEFORE_FIX,
        "bodies": [],
        "baseline": None,
        "attacks": [],
    }
    with ExitStack() as stack:
        progress("starting thallus serve")
        started = time.monotonic()
        served, settings = start_server(stack, options)
        document["source"] = source_of_thallus(settings)
        document["server"] = {
            "port": served.port,
            **served.started(settings, started),
            "rss_at_start_mib": memory_kib(served.pid)["VmRSS"] / 1024,
        }
        progress(f"  127.0.0.1:{served.port} pid {served.pid}, thallus from {document['source']['package']}")
        health_once(served.port, 10.0)
        if "bodies" in options.parts:
            for round_number in range(1, options.rounds + 1):
                for count in (1, 4):
                    for framing in ("declared", "chunked"):
                        item = body_run(
                            served,
                            addresses,
                            framing=framing,
                            count=count,
                            size=options.body_bytes,
                            round_number=round_number,
                        )
                        figures = item.document()
                        progress(
                            f"  round {round_number} bodies, {count} × {framing}: {figures['statuses']} in "
                            f"{ms(figures['answer_ms_max'])} ms, RSS {figures['rss_before_mib']:,.0f} → peak "
                            f"{figures['peak_mib']:,.0f} → {figures['rss_after_mib']:,.0f} MiB"
                        )
                        document["bodies"].append(figures)
        attacks = [name for name in ATTACKS if name in options.parts]
        if attacks:
            settle(served)
            fds_idle = open_fds(served.pid)
            if options.baseline > 0:
                origin, busy_before, started_baseline = time.time(), machine_busy_seconds(), time.perf_counter()
                prober = start_health_client(served.port, options.health_rate, origin + options.baseline)
                baseline = collect_health(prober, origin, options.baseline + 30.0)
                wall = time.perf_counter() - started_baseline
                document["baseline"] = {
                    **baseline.document(),
                    "machine_busy_share": (machine_busy_seconds() - busy_before) / wall,
                }
                progress(
                    f"  /health alone: {len(baseline.samples)} requests, p99 "
                    f"{ms(percentile(baseline.latencies_ms, 0.99))} ms"
                )
            for round_number in range(1, options.socket_rounds + 1):
                for name in attacks:
                    attack = attack_run(
                        served,
                        addresses,
                        options,
                        name=name,
                        round_number=round_number,
                        bounds=bounds,
                        fds_idle=fds_idle,
                    )
                    report_attack(attack.document)
                    document["attacks"].append(attack.document)
        document["server"] |= {"rss_at_end_mib": memory_kib(served.pid)["VmRSS"] / 1024}
        document["server"] |= served.stopped()
    document["spread"] = spread(document)
    return document


def report_attack(item: Mapping[str, Any]) -> None:
    health = item["health"]
    kinds = "; ".join(
        f"{name}: {figures['closed_by_server']} closed (median {_seconds(figures['close_seconds_median'])} s), "
        f"{figures['open_at_end']} open at the end"
        for name, figures in item["kinds"].items()
    )
    progress(
        f"  round {item['round']} {item['attack']}: peak {item['peak_open']} open; {kinds}; /health "
        f"{health['requests']} requests, p99 {ms(health['p99_ms'])} ms, max {ms(health['max_ms'])} ms"
    )


# -- reporting -------------------------------------------------------------------------------------


def spread(document: Mapping[str, Any]) -> dict[str, Any]:
    """Min, median and max over the rounds of every figure."""
    result: dict[str, Any] = {}
    for count in (1, 4):
        for framing in ("declared", "chunked"):
            runs = [item for item in document["bodies"] if item["count"] == count and item["framing"] == framing]
            if not runs:
                continue
            label = f"{count} × {framing}"
            result[f"{label}: answer ms (slowest)"] = spread_of([item["answer_ms_max"] for item in runs])
            result[f"{label}: peak RSS growth MiB"] = spread_of([item["peak_growth_mib"] for item in runs])
            result[f"{label}: RSS growth 1 s after MiB"] = spread_of([item["after_growth_mib"] for item in runs])
    for name, kinds in ATTACKS.items():
        runs = [item for item in document["attacks"] if item["attack"] == name]
        if not runs:
            continue
        for key, label in (("p50_ms", "p50"), ("p99_ms", "p99"), ("max_ms", "max")):
            result[f"{name}: /health {label} ms"] = spread_of([item["health"][key] for item in runs])
        result[f"{name}: peak sockets open"] = spread_of([item["peak_open"] for item in runs])
        for kind in kinds:
            figures = [item["kinds"][kind.name] for item in runs]
            result[f"{kind.name}: closed by the server"] = spread_of([f["closed_by_server"] for f in figures])
            result[f"{kind.name}: open → close s, median"] = spread_of([f["close_seconds_median"] for f in figures])
            result[f"{kind.name}: open → close s, max"] = spread_of([f["close_seconds_max"] for f in figures])
    return result


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f} %"


def _statuses(statuses: Mapping[str, int]) -> str:
    return " ".join(f"{status}×{count}" for status, count in sorted(statuses.items())) or "-"


def render(document: dict[str, Any]) -> str:
    options, source, bounds = document["options"], document["source"], document["bounds"]
    set_bounds = ", ".join(
        f"{name}={value:g}"
        for name, value in (
            ("THALLUS_HEADER_TIMEOUT", options["header_timeout"]),
            ("THALLUS_BODY_TIMEOUT", options["body_timeout"]),
        )
        if value is not None
    )
    rows: list[tuple[str, ...]] = []
    header: tuple[str, ...]
    lines = [
        *describe(document["environment"]),
        describe_import(source),
        "server: thallus serve, one uvicorn worker on 127.0.0.1, "
        + ", ".join(f"{name}={value}" for name, value in SETTINGS.items() if name != "THALLUS_SECRET_KEY")
        + ", a 48-character secret, SQLite in a temporary THALLUS_DATA_DIR; "
        + (f"{set_bounds}, the other bounds" if set_bounds else "the body limit and connection bounds")
        + f" at their defaults (header {bounds['header_timeout']:g} s, body {bounds['body_timeout']:g} s, "
        f"keep-alive {bounds['keep_alive']:g} s, 1 MiB bodies, 1000 connections)",
        f"client: file-descriptor limit {document['fd_limit']['soft']} (was {document['fd_limit']['soft_before']})",
    ]
    if document["bodies"]:
        size = options["body_bytes"]
        lines += [
            "",
            f"Oversized bodies: {size / MiB:g} MiB of JSON to POST {LOGIN}, {options['rounds']} round(s); every "
            "request from its own X-Forwarded-For address",
        ]
        rows = []
        for item in document["bodies"]:
            rows.append(
                (
                    str(item["round"]),
                    f"{item['count']} × {item['framing']}",
                    _statuses(item["statuses"]),
                    number(item["answer_ms_median"], ",.0f"),
                    number(item["answer_ms_max"], ",.0f"),
                    number(item["sent_mib_max"]),
                    number(item["rss_before_mib"], ",.0f"),
                    number(item["peak_mib"], ",.0f") + ("" if item["hwm_reset"] else "*"),
                    number(item["peak_growth_mib"], ",.1f"),
                    number(item["rss_after_mib"], ",.0f"),
                    number(item["after_growth_mib"], ",.1f"),
                )
            )
        header = (
            "round",
            "bodies",
            "statuses",
            "answer ms",
            "slowest ms",
            "sent MiB",
            "RSS before",
            "peak MiB",
            "peak +MiB",
            "1 s after",
            "after +MiB",
        )
        lines += text_table(header, rows, align="rllrrrrrrrr")
        quoted = document["before_fix_quoted"]
        lines.append(
            "answer ms: from the request's first byte to its whole answer (median of the bodies sent at once); "
            "sent MiB: body bytes written when the answer was in (the most of any); peak: VmHWM after clear_refs "
            "reset it, or the highest VmRSS sampled every 5 ms if higher (* where it could not be reset); "
            f"before the body limit (quoted): one body {quoted['one_before_mib']} → {quoted['one_peak_mib']} MiB "
            f"before a 400, four at once a {quoted['four_peak_mib'] / 1024:.1f} GiB peak and "
            f"{quoted['four_held_mib'] / 1024:.1f} GiB held."
        )
    if document["attacks"]:
        lines += [
            "",
            f"GET /health during each attack: a new connection {options['health_rate']:g} times a second, latency "
            f"from each request's scheduled start (target: p99 under {HEALTH_P99_TARGET_MS:g} ms)",
        ]
        rows = []
        runs: list[tuple[str, Mapping[str, Any]]] = []
        if document["baseline"] is not None:
            runs.append(("-", {"attack": "alone", "health": document["baseline"]}))
        runs += [(str(item["round"]), item) for item in document["attacks"]]
        for round_label, item in runs:
            health = item["health"]
            rows.append(
                (
                    round_label,
                    item["attack"],
                    str(health["requests"]),
                    _statuses(health["statuses"]),
                    number(health["p50_ms"]),
                    number(health["p99_ms"]),
                    number(health["max_ms"]),
                    _seconds(health["max_at_s"]),
                    _share(item.get("server_cpu_share")),
                    _share(item.get("other_cpu_share", health.get("machine_busy_share"))),
                )
            )
        header = (
            "round",
            "attack",
            "requests",
            "statuses",
            "p50 ms",
            "p99 ms",
            "max ms",
            "max at s",
            "server CPU",
            "other CPU",
        )
        lines += text_table(header, rows, align="rllrrrrrrr")
        lines.append(
            "max at s: when the slowest request was due, seconds after the attack began (the sockets all open at "
            "0; a bound closing a cohort reopens it at once). CPU: share of one CPU over the run; other = the "
            "machine's busy time beyond the server and this client (alone: the whole machine's)."
        )
        lines += [
            "",
            f"Slow sockets: {options['sockets']} held for {options['seconds']:g} s, each reopened when the server "
            f"closes it; trickled bytes every {options['trickle']:g} s",
        ]
        rows = []
        for item in document["attacks"]:
            for name, figures in item["kinds"].items():
                rows.append(
                    (
                        str(item["round"]),
                        name,
                        str(figures["opened"]),
                        str(item["peak_open"]),
                        str(item["server_peak_fds"]),
                        str(figures["closed_by_server"]),
                        _statuses(figures["closed_statuses"]),
                        _seconds(figures["close_seconds_median"]),
                        _seconds(figures["close_seconds_max"]),
                        str(figures["open_at_end"]),
                        _statuses(figures["open_at_end_answered"]),
                        _seconds(figures["oldest_open_seconds"]),
                        _seconds(figures["expected_close_seconds"]),
                    )
                )
        header = (
            "round",
            "sockets",
            "opened",
            "peak open",
            "server fds",
            "closed",
            "answers of closed",
            "close s",
            "max s",
            "open at end",
            "answered, open",
            "oldest s",
            "bound s",
        )
        lines += text_table(header, rows, align="rlrrrrlrrrlrr")
        lines.append(
            "peak open: this client's sockets connected at once (the attack's, all kinds); server fds: the server's "
            "open file descriptors, sampled every 0.25 s (the sockets plus its own ~13); closed: by the server, "
            "with the answers those sockets had received first (none: closed without one); close s / max s: open "
            "to close, median and slowest; answered, open: sockets still open at the end that had been answered; "
            "bound s: when a bound should have closed one (header deadline; body timeout + keep-alive idle)."
        )
    lines += spread_table(document["spread"])
    lines += ["", *notes(document)]
    return "\n".join(lines)


def notes(document: dict[str, Any]) -> list[str]:
    found = []
    limit = document["bounds"]["max_body_bytes"]
    for item in document["bodies"]:
        unexpected = {status: n for status, n in item["statuses"].items() if status != "413"}
        if unexpected and item["body_bytes"] > limit:
            found.append(
                f"bodies round {item['round']}, {item['count']} × {item['framing']}: answers other than 413: "
                f"{unexpected}" + "".join(f"; {a['error']}" for a in item["answers"] if a["error"])
            )
    for item in document["attacks"]:
        p99 = item["health"]["p99_ms"]
        label = f"{item['attack']} round {item['round']}"
        if p99 is not None:
            verdict = "met" if p99 < HEALTH_P99_TARGET_MS else "MISSED"
            found.append(f"{label}: /health p99 {p99:.1f} ms, target {HEALTH_P99_TARGET_MS:g} ms {verdict}")
        if item["health"]["error_count"] or set(item["health"]["statuses"]) - {"200"}:
            found.append(
                f"{label}: /health statuses {item['health']['statuses']}, {item['health']['error_count']} error(s)"
                + (f", first: {item['health']['errors'][0]}" if item["health"]["errors"] else "")
            )
        for name, figures in item["kinds"].items():
            expected = figures["expected_close_seconds"]
            if expected is not None:
                if figures["overdue_at_end"]:
                    found.append(
                        f"{label}, {name}: {figures['overdue_at_end']} socket(s) still open more than "
                        f"{expected:g} + 2 s after opening: the {figures['bound']} did not close them"
                    )
                elif figures["closed_by_server"] and item["seconds"] > expected:
                    found.append(
                        f"{label}, {name}: closed by the {figures['bound']} ({figures['closed_by_server']} closed, "
                        f"median {_seconds(figures['close_seconds_median'])} s, max "
                        f"{_seconds(figures['close_seconds_max'])} s); none left open past it"
                    )
            elif figures["open_at_end"] and figures["oldest_open_seconds"] is not None:
                found.append(
                    f"{label}, {name}: {figures['open_at_end']} socket(s) still open at the end, the oldest "
                    f"{figures['oldest_open_seconds']:.0f} s (answered: {_statuses(figures['open_at_end_answered'])}); "
                    f"{figures['closed_by_server']} closed by the server: no bound closes this kind"
                )
        if item["connect_failures"]:
            found.append(f"{label}: connections that failed: {item['connect_failures']}")
        if item["server_fds_after"] > item["server_fds_idle"] + 5:
            found.append(
                f"{label}: the server still had {item['server_fds_after']} file descriptors open after the attack "
                f"(idle: {item['server_fds_idle']})"
            )
    busy = [item["other_cpu_share"] for item in document["attacks"] if (item["other_cpu_share"] or 0) > 0.2]
    if busy:
        found.append(
            f"other work took more than 20 % of a CPU in {len(busy)} attack(s) (up to {max(busy) * 100:.0f} %): "
            "the server and the clients shared the machine with it, so /health's tail says as much about that; "
            "compare with 'alone' and rerun"
        )
    if lines := document["server"].get("log_lines"):
        found.append(f"server log: {lines}")
    if document["server"].get("output"):
        found.append(
            "server wrote (last lines): " + " | ".join(line[:200] for line in document["server"]["output"][-3:])
        )
    return found


# -- entry point -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the body measurements (default 3)")
    parser.add_argument("--socket-rounds", type=int, default=1, help="rounds of each slow-socket attack (default 1)")
    parser.add_argument("--body-mib", type=float, default=200.0, help="size of each oversized body, MiB (default 200)")
    parser.add_argument("--sockets", type=int, default=500, help="slow sockets held at once (default 500)")
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds of each slow-socket attack (default 60)")
    parser.add_argument(
        "--trickle", type=float, default=3.0, help="seconds between the bytes a slow socket trickles (default 3)"
    )
    parser.add_argument(
        "--baseline", type=float, default=10.0, help="seconds of /health alone before the attacks (default 10; 0: none)"
    )
    parser.add_argument("--health-rate", type=float, default=20.0, help="/health requests a second (default 20)")
    parser.add_argument(
        "--header-timeout", type=float, help="THALLUS_HEADER_TIMEOUT for the server (default: not set, 10 s)"
    )
    parser.add_argument(
        "--body-timeout", type=float, help="THALLUS_BODY_TIMEOUT for the server (default: not set, 30 s)"
    )
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write every raw figure to PATH as JSON")
    parser.add_argument("--health-client", metavar="PORT:RATE:UNTIL", help=argparse.SUPPRESS)  # the child process
    options = parser.parse_args(argv)
    options.parts = [part for part in options.parts.split(",") if part]
    if unknown := set(options.parts) - set(PARTS):
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    if options.rounds < 1 or options.socket_rounds < 1:
        parser.error("--rounds and --socket-rounds must be >= 1")
    if not 0 < options.body_mib <= 4096:
        parser.error("--body-mib must be above 0 and at most 4096")
    if not 1 <= options.sockets <= 5000:
        parser.error("--sockets must be 1–5000")
    if not 2 <= options.seconds <= 3600 or not 0 < options.trickle <= 60:
        parser.error("--seconds must be 2–3600 and --trickle above 0, at most 60")
    if options.baseline < 0 or not 0 < options.health_rate <= 1000:
        parser.error("--baseline must be >= 0 and --health-rate above 0, at most 1000")
    options.body_bytes = int(options.body_mib * MiB)
    return options


def main(argv: Sequence[str] | None = None) -> None:
    options = parse_args(argv)
    if options.health_client:
        health_client(options.health_client)
        return
    conclude("bench_abuse", lambda: run(options), render, json_path=options.json)


if __name__ == "__main__":
    main()
