"""Slow clients against a real ``thallus serve`` (raw sockets on loopback): every bound closes them.

Each attack held its socket for ever before: headers that never finish (slowloris), an endless
chunked body, a body shorter than its ``Content-Length``, an idle keep-alive connection, and more
connections than the server can serve. Bounds are set short here (1–2 s) so the suite stays fast;
the defaults are 10 s for headers, 30 s of body inactivity and 5 s of keep-alive idleness.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.server import Server, running_server

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
KEEP_ALIVE_TIMEOUT = 1
MAX_CONNECTIONS = 300
MIN_RATE = 100
LINGER = 2.0
#: Long enough for any bound to fire, short enough that a socket left open is plainly a failure.
GIVE_UP = 8.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data: Path = tmp_path_factory.mktemp("slow")
    environment = {
        "THALLUS_ENV": "production",
        "THALLUS_SECRET_KEY": "s" * 48,
        "THALLUS_ALLOWED_ORIGINS": "https://app.example.com",
        "THALLUS_PUBLIC_ORIGIN": "https://api.example.com",
        "THALLUS_DATA_DIR": str(data),
        "THALLUS_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
        "THALLUS_BODY_TIMEOUT": str(BODY_TIMEOUT),
        "THALLUS_KEEP_ALIVE_TIMEOUT": str(KEEP_ALIVE_TIMEOUT),
        "THALLUS_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        "THALLUS_MAX_CONNECTIONS_PER_CLIENT": "0",  # every socket here comes from 127.0.0.1
        "THALLUS_BODY_MIN_RATE": str(MIN_RATE),
        "THALLUS_RATE_LIMIT_ENABLED": "false",
    }
    with running_server(environment) as running:
        yield running


def connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=GIVE_UP)


def read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server writes until it closes the connection, and how long that took."""
    started = time.monotonic()
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            pytest.fail(f"the server kept the connection open for {GIVE_UP} s; it wrote {received[:200]!r}")
        except ConnectionResetError:  # closed while bytes we sent were unread: the kernel resets
            return received, time.monotonic() - started
        if not chunk:
            return received, time.monotonic() - started
        received += chunk


def parse(response: bytes) -> tuple[int, dict[str, str], dict[str, object]]:
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, json.loads(body)


def assert_error(response: bytes, status: int, error: str) -> dict[str, str]:
    code, headers, body = parse(response)
    assert code == status, response[:300]
    assert set(body) == {"error", "message", "details", "correlation_id"}
    assert body["error"] == error
    assert body["correlation_id"] == headers["x-correlation-id"]
    assert headers["content-type"] == "application/json"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    assert headers["cache-control"] == "no-store"
    assert headers["strict-transport-security"].startswith("max-age=")
    return headers


def test_a_connection_that_sends_nothing_is_closed(server: Server) -> None:
    with connect(server) as sock:
        response, waited = read_until_closed(sock)
    assert_error(response, 408, "RequestTimeoutError")
    assert HEADER_TIMEOUT * 0.8 <= waited < GIVE_UP


def test_headers_trickled_a_byte_at_a_time_are_cut_off(server: Server) -> None:
    """Slowloris: every byte arrives in time for a per-read timeout, the head never completes."""
    request = b"GET /health HTTP/1.1\r\nHost: api.example.com\r\nX-Slow: " + b"a" * 100
    with connect(server) as sock:
        sock.settimeout(0.5)
        started = time.monotonic()
        for byte in request:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            try:
                if sock.recv(65536, socket.MSG_PEEK):
                    break  # the server answered
            except TimeoutError:
                pass
            except OSError:
                break
            if time.monotonic() - started > GIVE_UP:
                pytest.fail("the trickled head was never cut off")
        sock.settimeout(GIVE_UP)
        response, _ = read_until_closed(sock)
    assert time.monotonic() - started < HEADER_TIMEOUT + 2, "cut off by the deadline, not by a read timeout"
    if response:  # else the close raced a byte still in flight and the kernel reset the connection
        assert_error(response, 408, "RequestTimeoutError")


def test_the_next_request_on_a_kept_alive_connection_gets_a_deadline_too(server: Server) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: api")  # then nothing more
        response, _ = read_until_closed(sock)
    assert_error(response, 408, "RequestTimeoutError")


def test_an_idle_keep_alive_connection_is_closed(server: Server) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
        response, waited = read_until_closed(sock)
    assert response.startswith(b"HTTP/1.1 200")
    assert waited < KEEP_ALIVE_TIMEOUT + 3


@pytest.mark.parametrize(
    "request_head",
    [
        # an endless chunked body: one chunk, then silence
        b"POST /api/v1/auth/login HTTP/1.1\r\nHost: api.example.com\r\nContent-Type: application/json\r\n"
        b'Origin: https://api.example.com\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{"a":\r\n',
        # a body shorter than its Content-Length
        b"POST /api/v1/auth/login HTTP/1.1\r\nHost: api.example.com\r\nContent-Type: application/json\r\n"
        b'Origin: https://api.example.com\r\nContent-Length: 100\r\n\r\n{"email":',
    ],
    ids=["endless-chunked", "short-body"],
)
def test_a_body_that_stops_arriving_ends_the_request(server: Server, request_head: bytes) -> None:
    with connect(server) as sock:
        sock.sendall(request_head)
        response, waited = read_until_closed(sock)
    assert_error(response, 408, "RequestTimeoutError")
    assert BODY_TIMEOUT * 0.8 <= waited < GIVE_UP


def test_a_trickled_body_is_cut_off_by_the_minimum_rate(server: Server) -> None:
    """A byte every 0.3 s never pauses for the body timeout; its average rate ends it."""
    head = (
        b"POST /api/v1/auth/login HTTP/1.1\r\nHost: api.example.com\r\nContent-Type: application/json\r\n"
        b"Origin: https://api.example.com\r\nContent-Length: 100000\r\n\r\n"
    )
    with connect(server) as sock:
        sock.sendall(head)
        sock.settimeout(0.3)
        started = time.monotonic()
        response = b""
        while time.monotonic() - started < GIVE_UP:
            try:
                sock.sendall(b"a")
                response += sock.recv(65536)
                if response.endswith(b"}"):
                    break
            except TimeoutError:
                continue
            except OSError:
                break
    assert_error(response, 408, "RequestTimeoutError")
    assert "slower than" in parse(response)[2]["message"]  # type: ignore[operator]
    assert time.monotonic() - started < BODY_TIMEOUT + 2


def test_a_body_sent_on_after_an_early_answer_does_not_hold_the_connection(server: Server) -> None:
    """A 413 before the body was read: the client keeps sending, the server closes after lingering."""
    head = (
        b"POST /api/v1/auth/login HTTP/1.1\r\nHost: api.example.com\r\nContent-Type: application/json\r\n"
        b"Origin: https://api.example.com\r\nContent-Length: 999999999\r\n\r\n"
    )
    with connect(server) as sock:
        sock.sendall(head)
        sock.settimeout(0.2)
        started = time.monotonic()
        response, closed = b"", False
        while time.monotonic() - started < GIVE_UP:
            try:
                sock.sendall(b"x" * 1024)
            except OSError:
                closed = True
                break
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                closed = True
                break
            if not chunk and response:
                closed = True  # our read side saw the server's shutdown; it closes soon after
            response += chunk
            time.sleep(0.05)
    assert_error(response, 413, "PayloadTooLargeError")
    assert closed, "the connection was still open"
    assert time.monotonic() - started < LINGER + 3


def test_connections_beyond_the_cap_get_a_json_503(server: Server) -> None:
    """Idle sockets up to the cap; the next connection is refused in the §8 shape, /health recovers."""
    sockets = []
    try:
        for _ in range(MAX_CONNECTIONS):
            sockets.append(connect(server))
        time.sleep(0.2)  # the server has accepted them all
        with connect(server) as extra:
            response, _ = read_until_closed(extra)
        headers = assert_error(response, 503, "ServiceUnavailableError")
        assert headers["retry-after"] == "1"
    finally:
        for sock in sockets:
            sock.close()
    deadline = time.monotonic() + GIVE_UP
    while httpx.get(server.url + "/health").status_code != 200:
        assert time.monotonic() < deadline


def test_slowloris_sockets_are_closed_and_health_still_answers(server: Server) -> None:
    """200 sockets trickling headers: all closed by the header deadline; /health answers meanwhile."""

    def slow_client(index: int) -> bool:
        with connect(server) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: api.example.com\r\n")
            response, _waited = read_until_closed(sock)
            return response.startswith(b"HTTP/1.1 408")

    with ThreadPoolExecutor(max_workers=200) as pool:
        closed = pool.map(slow_client, range(200))
        time.sleep(0.3)
        statuses = [httpx.get(server.url + "/health", timeout=5).status_code for _ in range(20)]
        assert all(closed)
    assert statuses == [200] * 20


@pytest.mark.parametrize("behind_proxy", [False, True])
def test_one_client_cannot_take_every_connection(tmp_path: Path, behind_proxy: bool) -> None:
    """Per client network (not for a trusted proxy, which carries everyone's connections)."""
    environment = {
        "THALLUS_ENV": "production",
        "THALLUS_SECRET_KEY": "s" * 48,
        "THALLUS_ALLOWED_ORIGINS": "https://app.example.com",
        "THALLUS_PUBLIC_ORIGIN": "https://api.example.com",
        "THALLUS_DATA_DIR": str(tmp_path),
        "THALLUS_MAX_CONNECTIONS_PER_CLIENT": "10",
    }
    if behind_proxy:
        environment["THALLUS_TRUSTED_PROXIES"] = "127.0.0.1"
    with running_server(environment) as server:
        sockets = [connect(server) for _ in range(10)]
        try:
            time.sleep(0.2)
            with connect(server) as extra:
                extra.sendall(b"GET /health HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
                response = extra.recv(65536)
        finally:
            for sock in sockets:
                sock.close()
    if behind_proxy:
        assert response.startswith(b"HTTP/1.1 200")
    else:
        assert_error(response, 503, "ServiceUnavailableError")
        assert b"This client has too many open connections" in response
