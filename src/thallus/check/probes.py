"""Sending the probes: one httpx client, one request at a time, never a redirect followed.

Politeness: the client talks only to the target's origin (every probe path starts with one ``/``,
and the URL is checked again before sending), ignores proxy variables and ``.netrc`` (``trust_env``
off), reads at most :data:`~thallus.check.model.BODY_LIMIT` bytes of a body and for at most
``timeout`` seconds, applies ``timeout`` to connecting and to every read, and refuses to send more
than ``budget`` requests.

Any transport failure — refused connection, timeout, TLS error, an answer that is not HTTP — ends
the scan with :class:`ScanError`, a one-line message (the CLI exits 2). httpx (the ``check`` extra)
is imported when a :class:`Prober` is made, so importing the package loads none of it.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

from thallus import __version__
from thallus.check.model import BODY_LIMIT, Answer, Probe, ScanError, Target

if TYPE_CHECKING:
    import httpx

USER_AGENT = f"thallus-check/{__version__}"


class Prober:
    """Sends probes to ``target``'s origin; ``sent`` counts the requests made."""

    def __init__(
        self, target: Target, *, timeout: float, budget: int, on_send: Callable[[Probe], None] | None = None
    ) -> None:
        import httpx

        self.target = target
        self.budget = budget
        self.timeout = timeout
        self.sent = 0
        self._on_send = on_send
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,
            trust_env=False,
            headers={"User-Agent": USER_AGENT, "Accept": "application/json, */*;q=0.1"},
        )

    def __enter__(self) -> Prober:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._client.close()

    def send(self, probe: Probe) -> Answer:
        import httpx

        if self.sent >= self.budget:
            raise RuntimeError(f"request budget of {self.budget} exceeded")  # a bug in the plan, not the target
        if not probe.path.startswith("/") or probe.path.startswith("//"):
            raise ValueError(f"probe path must be origin-relative: {probe.path!r}")
        target = self.target
        url = httpx.URL(target.origin + probe.path)
        if (url.scheme, url.raw_host.decode("ascii"), url.port) != (target.scheme, target.host, target.port):
            raise ValueError(f"probe would leave the target: {url}")
        if self._on_send is not None:
            self._on_send(probe)
        self.sent += 1
        request = self._client.build_request(probe.method, url, headers=list(probe.headers), content=probe.body)
        try:
            response = self._client.send(request, stream=True)
            try:
                body = _read_capped(response, time.monotonic() + self.timeout)
            finally:
                response.close()
        except httpx.HTTPError as exc:
            raise ScanError(describe(exc, self.target, probe, self.timeout)) from None
        headers = tuple(
            (name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in response.headers.raw
        )
        return Answer(probe, response.status_code, headers, body)


def _read_capped(response: httpx.Response, deadline: float) -> bytes:
    """At most BODY_LIMIT bytes, and only what arrives before ``deadline`` (a trickling body is cut)."""
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) >= BODY_LIMIT or time.monotonic() > deadline:
            break
    return bytes(body[:BODY_LIMIT])


def describe(exc: httpx.HTTPError, target: Target, probe: Probe, timeout: float) -> str:
    """One line naming what failed, for the user (no traceback)."""
    import httpx

    where = f"{target.origin} ({probe.title})"
    tls = _tls_error(exc)
    if tls is not None:
        return f"TLS error talking to {where}: {_one_line(tls)}"
    if isinstance(exc, httpx.TimeoutException):
        kind = "connecting" if isinstance(exc, httpx.ConnectTimeout) else "waiting for an answer"
        return f"timed out {kind}: {where} did not answer within {timeout:g} s (--timeout)"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect to {where}: {_one_line(exc) or 'connection failed'}"
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"not an HTTP answer from {where}: {_one_line(exc)}"
    if isinstance(exc, httpx.ReadError | httpx.WriteError):
        return f"connection to {where} broke: {_one_line(exc) or type(exc).__name__}"
    return f"request to {where} failed: {type(exc).__name__}: {_one_line(exc)}"


def _tls_error(exc: BaseException) -> BaseException | None:
    seen: BaseException | None = exc
    for _ in range(8):  # the cause chain, bounded
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError | ssl.CertificateError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."
