"""Serve one of tests/frameworks/apps under uvicorn, as a process on a loopback port, for black-box checks.

Every framework page of docs/frameworks/ is backed by a test class built on :class:`Conformance`
(tests/frameworks/conformance.py), which talks to the app this module starts: real sockets, a real
server, the settings read from ``THALLUS_*`` variables as a deployment reads them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.leaks import leaking_lines
from tests.server import Server, free_port

ROOT = Path(__file__).resolve().parents[2]

#: The allowlisted single-page app, and an origin nobody trusts.
SPA = "https://app.example"
FOREIGN = "https://evil.example"

#: What each app is served with: the test profile (CSRF needs origin evidence, no HSTS), one
#: allowlisted origin. THALLUS_SECRET_KEY is for Settings versions that still ask for one in
#: ``test``; THALLUS_ENV_FILE="" keeps a developer's .env out.
ENVIRONMENT = {
    "THALLUS_ENV": "test",
    "THALLUS_ALLOWED_ORIGINS": SPA,
    "THALLUS_SECRET_KEY": "framework-tests-" + "s" * 32,
    "THALLUS_ENV_FILE": "",
    "DJANGO_SECRET_KEY": "framework-tests-django-" + "d" * 32,
}
START_SECONDS = 30.0


@contextmanager
def serving(target: str, environment: Mapping[str, str] = ENVIRONMENT) -> Iterator[Server]:
    """``uvicorn TARGET`` (``module:attribute``) on 127.0.0.1 and a free port, until the block ends.

    uvicorn's own ``Server`` header is turned off as the docs tell: it is added by the server after
    the application has answered, so no ASGI layer can remove it. The output is scanned for secrets
    when the server stops, as tests.server.running_server does for ``thallus serve``.
    """
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("THALLUS_") or k.startswith("THALLUS_TEST_")}
    env.update(environment)
    with tempfile.TemporaryDirectory(prefix="thallus-frameworks-") as data_dir:
        env["XDG_DATA_HOME"] = data_dir
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", str(port), "--no-server-header"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        server = Server(f"http://127.0.0.1:{port}", port, process)
        server.start_reading()
        try:
            _wait_until_answering(server)
            yield server
        finally:
            output = server.output()
    leaks = leaking_lines(output.splitlines())
    assert not leaks, f"{target} logged {len(leaks)} lines carrying a secret, e.g. {leaks[:2]}"


def _wait_until_answering(server: Server) -> None:
    deadline = time.monotonic() + START_SECONDS
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"uvicorn exited with {server.process.returncode}: {server.output()}")
        try:
            httpx.get(server.url + "/items", timeout=1)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not answer within {START_SECONDS} s: {server.output()}") from None
            time.sleep(0.05)
