"""Oversized request bodies against a real ``thallus serve`` (raw sockets on loopback).

Before the body limit, every JSON endpoint read a body whole: one 200 MiB body to
``POST /api/v1/auth/login`` raised the server's RSS from 118 to 519 MiB before its 400, four at once
peaked at 2.7 GiB, and ``POST /api/v1/api-keys`` did the same without any credentials. Now a
declared ``Content-Length`` over ``THALLUS_MAX_BODY_BYTES`` (1 MiB) is refused before a byte is read
and a chunked body as soon as it passes the limit, with the §8 ``413 PayloadTooLargeError``.

Each attack streams its 200 MiB lazily (64 KiB at a time, from a thread) while the test reads the
answer as soon as it arrives; the server may answer, and discard or close, long before the client
is done sending. The server's peak memory is its ``VmHWM`` after ``/proc/<pid>/clear_refs`` reset
it (and, as a cross-check, the highest ``VmRSS`` sampled every 5 ms), over its ``VmRSS`` before.

All traffic goes to 127.0.0.1; ``THALLUS_TRUSTED_PROXIES=127.0.0.1`` and a new ``X-Forwarded-For``
per request keep the per-address rate limits (10/minute on sign-in) out of the way, so every request
reaches the body limit with the production stack otherwise untouched.
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.bodies_support import body_head, memory_kib, read_response, reset_peak, send_body
from tests.server import Server, running_server

LOGIN = "/api/v1/auth/login"
API_KEYS = "/api/v1/api-keys"
MiB = 1024 * 1024
DEFAULT_LIMIT = 1024 * 1024
ATTACK_BYTES = 200 * MiB
#: Peak RSS growth allowed for one refused 200 MiB body, and for four at once (the old code: +400 MiB, +2.6 GiB).
ONE_BODY_GROWTH_MIB = 64
FOUR_BODIES_GROWTH_MIB = 128
#: Every wait on the server ends here; a response later than this is a failure, not a hang.
GIVE_UP = 30.0
_addresses = itertools.count(1)


def production(data: Path, **extra: str) -> dict[str, str]:
    return {
        "THALLUS_ENV": "production",
        "THALLUS_SECRET_KEY": "bodies-served-" + "k" * 34,  # 48 characters
        "THALLUS_PUBLIC_ORIGIN": "https://api.example.com",
        "THALLUS_ALLOWED_ORIGINS": "https://app.example.com",
        "THALLUS_TRUSTED_PROXIES": "127.0.0.1",
        "THALLUS_DATA_DIR": str(data),
        **extra,
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(production(tmp_path_factory.mktemp("bodies"))) as running:
        yield running


@pytest.fixture(scope="module")
def small_limit_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    environment = production(tmp_path_factory.mktemp("bodies-2048"), THALLUS_MAX_BODY_BYTES="2048")
    with running_server(environment) as running:
        yield running


# -- the server's memory ---------------------------------------------------------------------------


class PeakMemory:
    """The server's peak RSS growth over a ``with`` block: ``VmHWM`` (reset on entry through
    ``clear_refs``) and the highest ``VmRSS`` sampled every 5 ms, over ``VmRSS`` on entry."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = 0
        self.peak = 0
        self.hwm_reset = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, memory_kib(self.pid)["VmRSS"])

    def __enter__(self) -> PeakMemory:
        self.before = self.peak = memory_kib(self.pid)["VmRSS"]
        self.hwm_reset = reset_peak(self.pid)  # VmHWM := VmRSS
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        status = memory_kib(self.pid)
        self.peak = max(self.peak, status["VmRSS"], status["VmHWM"] if self.hwm_reset else 0)

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.before) / 1024


# -- the attack ------------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: dict[str, object]
    #: body bytes the client had written when the answer was complete
    sent: int
    seconds: float
    send_error: str | None = None
    raw: bytes = field(default=b"", repr=False)


def attack(server: Server, path: str, framing: str, total: int, start: threading.Barrier | None = None) -> Answer:
    """``total`` body bytes to ``path``, written by a thread while this one waits for the answer
    (:func:`send_body`); the sending stops once it has come (or the server closed)."""
    n = next(_addresses)
    head = body_head(path, total, framing, f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}")
    exchange = send_body(server.port, head, total, framing, GIVE_UP, start)
    raw, send_error = exchange.raw, exchange.send_error
    assert exchange.early in (None, "closed", "reset"), f"{exchange.early}; the server wrote {raw[:300]!r}"
    assert not exchange.writer_alive, "the sending thread did not stop"
    head_bytes, _, body = raw.partition(b"\r\n\r\n")
    assert head_bytes.startswith(b"HTTP/1.1 "), f"no answer ({raw[:200]!r}); sending: {send_error}"
    status_line, *lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    try:
        document = json.loads(body) if body else {}
    except ValueError:
        document = {"unparsed": body[:200].decode("latin-1")}
    return Answer(
        int(status_line.split()[1]),
        headers,
        document,
        exchange.sent,
        exchange.seconds,
        f"{type(send_error).__name__}: {send_error}" if send_error is not None else None,
        raw,
    )


def assert_payload_too_large(answer: Answer, limit: int = DEFAULT_LIMIT, summary: str = "") -> None:
    assert answer.status == 413, f"{answer.status} {answer.body.get('error')}; {summary}"
    assert set(answer.body) == {"error", "message", "details", "correlation_id"}
    assert answer.body["error"] == "PayloadTooLargeError"
    assert answer.body["details"] == {"max_body_bytes": limit}
    assert answer.body["correlation_id"] == answer.headers["x-correlation-id"]
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["x-frame-options"] == "DENY"
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers["strict-transport-security"].startswith("max-age=")
    assert "content-security-policy" in answer.headers


def assert_alive(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=GIVE_UP) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n")
        assert read_response(sock, GIVE_UP)[0].startswith(b"HTTP/1.1 200")


ENDPOINTS = pytest.mark.parametrize("path", [LOGIN, API_KEYS], ids=["login", "api-keys"])
FRAMINGS = pytest.mark.parametrize("framing", ["declared", "chunked"])


@ENDPOINTS
@FRAMINGS
def test_one_200_mib_body_is_refused_without_being_held(server: Server, path: str, framing: str) -> None:
    with PeakMemory(server.process.pid) as memory:
        answer = attack(server, path, framing, ATTACK_BYTES)
    summary = (
        f"{answer.status} after {answer.seconds:.2f} s and {answer.sent / MiB:.0f} MiB sent, "
        f"peak RSS +{memory.growth_mib:.0f} MiB over {memory.before / 1024:.0f} MiB"
    )
    assert_payload_too_large(answer, summary=summary)
    assert memory.growth_mib < ONE_BODY_GROWTH_MIB, summary
    assert answer.sent < 64 * MiB, f"answered only once most of the body was sent: {summary}"
    assert_alive(server)


@ENDPOINTS
@FRAMINGS
def test_four_200_mib_bodies_at_once_are_refused_without_being_held(server: Server, path: str, framing: str) -> None:
    start = threading.Barrier(4)
    with PeakMemory(server.process.pid) as memory, ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(lambda _: attack(server, path, framing, ATTACK_BYTES, start), range(4)))
    statuses = [answer.status for answer in answers]
    summary = f"statuses {statuses}, peak RSS +{memory.growth_mib:.0f} MiB over {memory.before / 1024:.0f} MiB"
    for answer in answers:
        assert_payload_too_large(answer, summary=summary)
    assert memory.growth_mib < FOUR_BODIES_GROWTH_MIB, summary
    assert_alive(server)


@FRAMINGS
def test_a_body_just_under_the_limit_still_reaches_the_route(server: Server, framing: str) -> None:
    answer = attack(server, LOGIN, framing, 1_000_000)
    assert answer.status in (401, 422), (answer.status, answer.body)
    assert answer.body["correlation_id"] == answer.headers["x-correlation-id"]


@FRAMINGS
def test_the_limit_is_the_setting(small_limit_server: Server, framing: str) -> None:
    """``THALLUS_MAX_BODY_BYTES=2048``: a 4 KiB login body is a 413 naming 2048; 2000 bytes reach the route."""
    assert_payload_too_large(attack(small_limit_server, LOGIN, framing, 4096), limit=2048)
    assert attack(small_limit_server, LOGIN, framing, 2000).status in (401, 422)
