"""Run ``thallus serve`` as a real process for black-box tests over loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import httpx
import uvicorn

from tests.leaks import leaking_lines

THALLUS = str(Path(sys.executable).parent / "thallus")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    """A ``thallus serve`` process. Its output is read as it comes, by one thread (a pipe left
    unread fills and stalls the server's logging); ``lines`` holds it, each line as written."""

    url: str
    port: int
    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    def start_reading(self) -> None:
        if self._reader is None and self.process.stdout is not None:
            self._reader = threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True)
            self._reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line)

    def output(self) -> str:
        """Everything the server wrote (stops it first)."""
        self.stop()
        if self._reader is not None:
            self._reader.join(10)
        return "".join(self.lines)

    def stop(self) -> None:
        stop_process(self.process, 10)


def stop_process(process: subprocess.Popen[str], grace: float) -> None:
    """SIGTERM, then SIGKILL if the process has not exited after ``grace`` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until_answering(process: subprocess.Popen[str], url: str, seconds: float, output: Callable[[], str]) -> None:
    """Poll ``url`` until it answers; fail with the process's ``output()`` if it exits first or
    does not answer within ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}: {output()}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{process.args!r} did not answer within {seconds:g} s: {output()}") from None
            time.sleep(0.1)


@contextmanager
def running_server(environment: Mapping[str, str], *extra_args: str) -> Iterator[Server]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("THALLUS_") or k.startswith("THALLUS_TEST_")}
    env.update(environment)
    data_dir = None
    if "THALLUS_DATA_DIR" not in env:  # never the developer's own ~/.local/share/thallus
        data_dir = tempfile.TemporaryDirectory(prefix="thallus-serve-")
        env["THALLUS_DATA_DIR"] = data_dir.name
    process = subprocess.Popen(
        [THALLUS, "serve", "--host", "127.0.0.1", "--port", str(port), *extra_args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    server = Server(f"http://127.0.0.1:{port}", port, process)
    server.start_reading()
    try:
        wait_until_answering(process, server.url + "/health", 20, server.output)
        yield server
    finally:
        output = server.output()
        if data_dir is not None:
            data_dir.cleanup()
    leaks = leaking_lines(output.splitlines())
    assert not leaks, f"thallus serve logged {len(leaks)} lines carrying a secret, e.g. {leaks[:2]}"


def serving(command: list[str], cwd: Path, url: str, env: Mapping[str, str] | None = None) -> Iterator[str]:
    """Run ``command`` (any server) in ``cwd`` until ``url`` answers; yield ``url``; stop it.

    For servers other than ``thallus serve`` (:func:`running_server`): uvicorn or ``fastapi run``
    on a module, a wheel's console script. Iterate it once (``for url in serving(...)``)."""
    process = subprocess.Popen(
        command, cwd=cwd, env=dict(env) if env is not None else None, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_until_answering(process, url, 60, lambda: process.stdout.read()[-3000:] if process.stdout else "")
        yield url
    finally:
        stop_process(process, 10)
        if process.stdout is not None:
            process.stdout.close()


#: How long an in-process uvicorn may take to start, or to stop.
THREAD_START_SECONDS = 10


@contextmanager
def served(app: Any, host: str = "127.0.0.1", tls: tuple[str, str] | None = None) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a loopback port in a thread (over TLS with ``tls``, a
    certificate and key file); yields its base URL."""
    port = free_port(host)
    config = uvicorn.Config(
        cast(Any, app),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        server_header=False,
        ssl_certfile=tls[0] if tls else None,
        ssl_keyfile=tls[1] if tls else None,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + THREAD_START_SECONDS
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"{'https' if tls else 'http'}://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(THREAD_START_SECONDS)
