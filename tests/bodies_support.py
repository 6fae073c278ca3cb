"""Oversized bodies against a served process: the lazily generated JSON body, its framing, sending
it while the answer is read, and the server's memory as ``/proc`` reports it.

Shared by tests/test_bodies_served.py and the benchmarks (bench_abuse, bench_login, through
benchmarks/served.py): the benchmarks import from ``tests`` as they do ``tests.server``, never the
other way round, and nothing here is imported by ``src``.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

CHUNK = 64 * 1024
#: the browser origin the served tests and benchmarks allow, and the host they name
APP_ORIGIN = "https://app.example.com"
HOST = "api.example.com"


def json_body(total: int) -> Iterator[bytes]:
    """A valid JSON login body of exactly ``total`` bytes, 64 KiB at a time, never held whole."""
    prefix, suffix = b'{"email":"attacker@example.com","password":"', b'"}'
    yield prefix
    filler = memoryview(b"a" * CHUNK)
    remaining = total - len(prefix) - len(suffix)
    while remaining > 0:
        piece = filler[: min(CHUNK, remaining)]
        remaining -= len(piece)
        yield bytes(piece)
    yield suffix


def framed(total: int, framing: str) -> Iterator[bytes]:
    """:func:`json_body` as it goes on the wire: as is (``declared``, after a ``Content-Length``
    head) or in chunks of its pieces (``chunked``), the last chunk included."""
    if framing == "declared":
        yield from json_body(total)
        return
    for piece in json_body(total):
        yield b"%x\r\n%s\r\n" % (len(piece), piece)
    yield b"0\r\n\r\n"


def body_head(path: str, total: int, framing: str, forwarded: str) -> bytes:
    """A JSON ``POST`` head from the allowed origin through the trusted proxy (``X-Forwarded-For:
    forwarded``), announcing ``total`` body bytes (``declared``) or a ``chunked`` body."""
    length = f"Content-Length: {total}" if framing == "declared" else "Transfer-Encoding: chunked"
    return (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
        f"Origin: {APP_ORIGIN}\r\nX-Forwarded-For: {forwarded}\r\n{length}\r\n\r\n"
    ).encode()


def read_response(sock: socket.socket, timeout: float) -> tuple[bytes, str | None]:
    """One whole response as soon as it is there (head and ``Content-Length`` body), or what came
    before the server closed, or reset, the connection, or ``timeout`` seconds passed; with the
    reason it stopped early (``None``: the response is whole)."""
    deadline = time.monotonic() + timeout
    received = b""
    while True:
        head, separator, rest = received.partition(b"\r\n\r\n")
        if separator:
            lengths = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
            if lengths and len(rest) >= int(lengths[0].split(b":", 1)[1]):
                return received, None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return received, f"no answer within {timeout:g} s"
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:  # closed with our bytes unread: the kernel resets; keep what came
            return received, "reset"
        except OSError as exc:
            return received, f"{type(exc).__name__}: {exc}"
        if not chunk:
            return received, "closed"
        received += chunk


@dataclass
class Exchange:
    """One body sent while its answer was read (:func:`send_body`)."""

    #: the answer, or what came of it
    raw: bytes
    #: why the answer stopped short of a whole response (``None``: it is whole)
    early: str | None
    #: body bytes the client had written when the answer was complete
    sent: int
    #: seconds from the first byte written to the answer (or to giving up on it)
    seconds: float
    #: what stopped the writing before the answer came, if anything did
    send_error: OSError | None
    #: whether the writing thread was still running after the wait for it
    writer_alive: bool


def send_body(
    port: int, head: bytes, total: int, framing: str, timeout: float, start: threading.Barrier | None = None
) -> Exchange:
    """``head`` and then ``total`` body bytes (:func:`framed`) to 127.0.0.1:``port``, written by a
    thread while this one reads the answer as soon as it arrives; the writing stops once the answer
    has come, or the server closed. ``start``: wait there first (bodies sent at once); every wait
    ends after ``timeout`` seconds."""
    sent = 0
    stop = threading.Event()
    send_error: list[OSError] = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:

        def write() -> None:
            nonlocal sent
            try:
                sock.sendall(head)
                for piece in framed(total, framing):
                    if stop.is_set():
                        return
                    sock.sendall(piece)
                    sent += len(piece)
            except OSError as exc:  # the server closed, or this side did once the answer was in
                if not stop.is_set():
                    send_error.append(exc)

        if start is not None:
            start.wait(timeout)
        began = time.perf_counter()
        writer = threading.Thread(target=write, name="body-writer", daemon=True)
        writer.start()
        raw, early = read_response(sock, timeout)
        seconds = time.perf_counter() - began
        written = sent
        stop.set()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # wakes a sendall blocked on a full buffer
        writer.join(timeout)
    return Exchange(raw, early, written, seconds, send_error[0] if send_error else None, writer.is_alive())


def memory_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of a process, KiB (``/proc/<pid>/status``)."""
    found = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                found[name] = int(value.split()[0])
    return found


def reset_peak(pid: int) -> bool:
    """Reset ``VmHWM`` to the current RSS (``5`` to ``clear_refs``, Linux ≥ 4.0); whether it was permitted."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")
    except OSError:
        return False
    return True
