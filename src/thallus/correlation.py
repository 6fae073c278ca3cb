"""Correlation IDs: one ID per request, in every response, log line, error body and audit record.

Rules (docs/design.md §7):

* a client's ``X-Correlation-ID`` is used when it is 1–128 characters of ``[A-Za-z0-9._:-]``
  starting with a letter or digit, and sent once; anything else is replaced by a generated ID
  and the rejection is logged with the raw value escaped and truncated (never verbatim — the
  header is attacker-controlled, asgi-correlation-id PR #71);
* generated IDs are UUIDv7 (RFC 9562 §5.7), time-ordered, so sorting by ID sorts by time;
* the ID is bound to a :class:`~contextvars.ContextVar` for the request's lifetime, *set* (never
  appended) on the response, written back into the request headers so inner layers and tracers
  see the effective value, and offered to outgoing ``httpx`` calls (:func:`propagate_correlation_id`).

The header, the generator and the validator are options (:class:`CorrelationIds`), like
asgi-correlation-id's ``header_name``/``generator``/``validator``: e.g. ``X-Request-ID`` where the
platform already sets that one. A custom validator narrows a header-safe baseline (visible ASCII,
at most :data:`MAX_CUSTOM_LENGTH` characters), never widens it, since the accepted value is copied
verbatim into logs, error bodies and the response; a custom generator's IDs must pass it too.

**Trace context** (W3C Trace Context Level 1, https://www.w3.org/TR/trace-context/): a valid
``traceparent`` (one header; version ``00`` exactly, or a later version read by its first four
fields; trace and parent IDs not all zeros; lower-case hex) is accepted — it stays in the request
headers for inner layers and tracers, and :func:`propagate_correlation_id` sends it on (with a
new parent ID: the outgoing call is a child of this hop). When the client sent no correlation
header, the trace ID (32 hex digits) becomes the correlation ID, so logs and traces join on one
value. An invalid ``traceparent`` is ignored, never an error. With OpenTelemetry installed
(``thallus[otel]``), the correlation ID is set as the ``correlation_id`` attribute of the span that
is current when the response starts, and outgoing calls carry the current span's context instead.

The layer also writes the one access-log line per request (method, path, status, duration), since
it is the outermost layer and sees the final status of every response.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from thallus._asgi import RESPONSE_START_TYPES, ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    import httpx

HEADER = "X-Correlation-ID"
HEADER_KEY = b"x-correlation-id"
STATE_KEY = "correlation_id"
MAX_LENGTH = 128
#: The longest ID a custom validator may accept (or a custom generator produce).
MAX_CUSTOM_LENGTH = 256
_VALID = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_HEADER_SAFE = re.compile(rb"[\x21-\x7e]{1,%d}" % MAX_CUSTOM_LENGTH)
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 §5.6.2: a header name
_LOGGED_SAMPLE = 64

logger = logging.getLogger("thallus.correlation")
access_logger = logging.getLogger("thallus.access")

correlation_id_var: ContextVar[str | None] = ContextVar("thallus_correlation_id", default=None)

TRACEPARENT_KEY = b"traceparent"
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE_ID = "0" * 32
_ZERO_PARENT_ID = "0" * 16


@dataclass(frozen=True, slots=True)
class TraceParent:
    """A valid ``traceparent``'s fields (W3C Trace Context §3.2)."""

    trace_id: str
    parent_id: str
    flags: str

    def child(self) -> str:
        """The ``traceparent`` of a call made from this hop: same trace and flags, a new parent ID."""
        return f"00-{self.trace_id}-{os.urandom(8).hex()}-{self.flags}"


def parse_traceparent(raw: bytes) -> TraceParent | None:
    """The fields of a ``traceparent`` value, or ``None`` if it is not valid (§3.2.2: version
    ``ff`` is invalid; version ``00`` is exactly 55 characters; a later version may append fields
    after a ``-``; all-zero trace or parent IDs are invalid)."""
    match = _TRACEPARENT.match(raw)
    if match is None:
        return None
    version = match.group(1)
    if version == b"ff" or (version == b"00" and len(raw) != 55) or (len(raw) > 55 and raw[55:56] != b"-"):
        return None
    trace_id, parent_id = match.group(2).decode(), match.group(3).decode()
    if trace_id == _ZERO_TRACE_ID or parent_id == _ZERO_PARENT_ID:
        return None
    return TraceParent(trace_id, parent_id, match.group(4).decode())


#: The current request's valid ``traceparent`` (``None`` if it brought none); set for every request.
trace_parent_var: ContextVar[TraceParent | None] = ContextVar("thallus_trace_parent", default=None)


def _has_opentelemetry() -> bool:
    """Whether OpenTelemetry's API is installed (its ``trace`` module, not just the namespace)."""
    try:
        return importlib.util.find_spec("opentelemetry.trace") is not None
    except ImportError:  # no "opentelemetry" package at all
        return False


_OPENTELEMETRY = _has_opentelemetry()


@functools.cache
def _opentelemetry() -> Any:
    """OpenTelemetry's ``trace`` and ``propagate`` modules, imported on first use, not at start-up."""
    from opentelemetry import propagate, trace

    return trace, propagate


def _span_annotator() -> Callable[[bytes], None] | None:
    """With OpenTelemetry installed: a function that sets ``correlation_id`` on the current span."""
    if not _OPENTELEMETRY:
        return None

    def annotate(correlation_id: bytes) -> None:
        span = _opentelemetry()[0].get_current_span()
        if span.is_recording():
            span.set_attribute("correlation_id", correlation_id.decode("ascii", "replace"))

    return annotate


#: Called with the correlation ID at each response start, or ``None`` without OpenTelemetry.
annotate_span = _span_annotator()


def get_correlation_id() -> str | None:
    """The current request's correlation ID, or ``None`` outside a request."""
    return correlation_id_var.get()


def is_valid_correlation_id(value: bytes | str) -> bool:
    """Whether a client-supplied value may be used as the correlation ID (docs/design.md §7)."""
    raw = value.encode("latin-1", "replace") if isinstance(value, str) else value
    return _VALID.fullmatch(raw) is not None


# -- UUIDv7 ---------------------------------------------------------------------------------

try:
    import uuid_utils
except ModuleNotFoundError:  # the optional speed-up (``thallus[speedups]``, in ``thallus[server]``)
    uuid_utils = None  # type: ignore[assignment]

_MAX_COUNTER = 0xFFF  # rand_a: 12 bits
_counter_lock = threading.Lock()
_last = [0, 0]  # [milliseconds, counter] of the last ID this process minted


def _python_uuid7() -> str:
    """A UUIDv7 (RFC 9562 §5.7) in Python: 48-bit Unix milliseconds, a 12-bit counter started at a
    random value each millisecond (§6.2 method 1, leaving headroom) and 62 bits of ``os.urandom``;
    a counter that overflows borrows the next millisecond, so IDs strictly increase in a process."""
    now = time.time_ns() // 1_000_000
    with _counter_lock:
        last, counter = _last
        if now <= last:
            now, counter = last, counter + 1
            if counter > _MAX_COUNTER:
                now, counter = last + 1, 0
        else:
            counter = int.from_bytes(os.urandom(2), "big") & 0x7FF
        _last[0], _last[1] = now, counter
    random_b = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (now << 80) | (0x7 << 76) | (counter << 64) | (0b10 << 62) | random_b
    digits = f"{value:032x}"
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


if uuid_utils is not None:
    # uuid-utils draws its random bits from a user-space CSPRNG that a forked child would share
    # with its parent (uuid-utils #42): reseed it in every child, so no two processes mint the same IDs.
    os.register_at_fork(after_in_child=uuid_utils.reseed_rng)
    _uuid7_native = uuid_utils.uuid7

    def uuid7() -> str:
        """A UUIDv7 string (RFC 9562 §5.7): 48-bit Unix milliseconds, then a counter seeded with
        random bits each millisecond (§6.2 method 2) and 32 fresh random bits. Strictly increasing
        within a process, so IDs minted in the same tick still sort in creation order. uuid-utils
        mints it in native code (~0.2 µs, against ~1.5 µs in Python)."""
        return str(_uuid7_native())

else:
    uuid7 = _python_uuid7


def escape_for_log(raw: bytes) -> str:
    """A short, printable rendering of untrusted bytes for a log line."""
    sample = raw[:_LOGGED_SAMPLE].decode("ascii", "backslashreplace")
    sample = "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in sample)
    return sample + ("…" if len(raw) > _LOGGED_SAMPLE else "")


# -- the layer ------------------------------------------------------------------------------


Generator = Callable[[], str]
Validator = Callable[[str], bool]


class CorrelationIds:
    """Where the correlation ID travels and what it may be; checked at construction.

    ``header`` is an RFC 9110 token (default ``X-Correlation-ID``). ``generator`` returns a new
    ID (default :func:`uuid7`); ``validator`` says whether a client's value may be used (default:
    the rule of the module doc). A generator's sample ID must pass the validator — otherwise an ID
    this service hands out would be refused when a client or a peer sends it back.
    """

    __slots__ = ("_accepts", "_custom_generator", "_generate", "header", "key")

    def __init__(
        self, header: str = HEADER, *, generator: Generator | None = None, validator: Validator | None = None
    ) -> None:
        header = header.strip() if isinstance(header, str) else header
        if not isinstance(header, str) or not _TOKEN.fullmatch(header):
            raise ValueError(f"correlation header {header!r} is not a header name (RFC 9110 §5.6.2: a token)")
        if generator is not None and not callable(generator):
            raise TypeError("the correlation ID generator must be a callable returning a str")
        if validator is not None and not callable(validator):
            raise TypeError("the correlation ID validator must be a callable taking a str and returning a bool")
        self.header = header
        self.key = header.lower().encode("ascii")
        self._generate: Generator = generator or uuid7
        self._custom_generator = generator is not None
        self._accepts: Callable[[bytes], object] = _VALID.fullmatch if validator is None else _narrowed(validator)
        if generator is not None:
            sample = generator()
            raw = sample.encode("ascii") if isinstance(sample, str) and sample.isascii() else b""
            if not isinstance(sample, str) or not _HEADER_SAFE.fullmatch(raw):
                raise ValueError(
                    f"the correlation ID generator returned {sample!r}: IDs must be 1-{MAX_CUSTOM_LENGTH} "
                    "visible ASCII characters"
                )
            if not self._accepts(raw):
                raise ValueError(f"the correlation ID generator's {sample!r} is refused by the validator")

    def mint(self) -> tuple[str, bytes]:
        """A new ID and its header bytes. A custom generator's ID that is not header-safe (it
        passed at start-up) is replaced by a UUIDv7 and logged: the response must still go out."""
        if not self._custom_generator:
            value = uuid7()
            return value, value.encode("ascii")
        return self._mint_custom()

    def _mint_custom(self) -> tuple[str, bytes]:
        try:
            value = self._generate()
            raw = value.encode("ascii")
            if _HEADER_SAFE.fullmatch(raw):
                return value, raw
        except Exception:
            logger.exception("correlation ID generator failed; a UUIDv7 is used instead")
        else:
            logger.error("correlation ID generator returned an unusable ID; a UUIDv7 is used instead")
        value = uuid7()
        return value, value.encode("ascii")

    def accept_or_mint(
        self, scope: Scope, client_values: Sequence[bytes], traceparents: Sequence[bytes] = ()
    ) -> tuple[str, tuple[bytes, bytes]]:
        """The request's correlation ID and its response header, from the client's values of
        :attr:`header` (every one the request carried, in order): the single valid value; else,
        with no value at all, the trace ID of a single valid ``traceparent`` (``traceparents``:
        every one the request carried); else a new ID, a refusal logged.

        The effective ID is written into ``scope["headers"]`` (refused values removed) and
        ``scope["state"]``, so inner layers, handlers and tracers all see the same value.
        """
        key = self.key
        trace_parent = parse_traceparent(traceparents[0]) if len(traceparents) == 1 else None
        trace_parent_var.set(trace_parent)
        if len(client_values) == 1 and self._accepts(client_values[0]):
            correlation_id = client_values[0].decode("ascii")
            header = (key, client_values[0])
        elif (
            not client_values and trace_parent is not None and self._accepts(trace_id := trace_parent.trace_id.encode())
        ):
            correlation_id = trace_parent.trace_id
            header = (key, trace_id)
            scope["headers"] = [*scope["headers"], header]
        else:
            if self._custom_generator:
                correlation_id, raw = self._mint_custom()
            else:  # mint() inlined: this is every request that brings no ID
                correlation_id = uuid7()
                raw = correlation_id.encode("ascii")
            header = (key, raw)
            if client_values:
                logger.warning(
                    "client correlation ID refused; generated %s",
                    correlation_id,
                    extra={
                        "correlation_id": correlation_id,
                        "refused_values": [escape_for_log(value) for value in client_values[:4]],
                        "refused_count": len(client_values),
                    },
                )
                scope["headers"] = [(name, value) for name, value in scope["headers"] if name.lower() != key]
                scope["headers"].append(header)
            else:
                scope["headers"] = [*scope["headers"], header]
        state = scope.get("state")
        if state is None:
            scope["state"] = {STATE_KEY: correlation_id}
        else:
            state[STATE_KEY] = correlation_id
        return correlation_id, header


def _narrowed(validator: Validator) -> Callable[[bytes], bool]:
    """``validator`` behind the header-safe baseline; a validator that raises refuses the value."""

    def accepts(raw: bytes) -> bool:
        if not _HEADER_SAFE.fullmatch(raw):
            return False
        try:
            return bool(validator(raw.decode("ascii")))
        except Exception:
            logger.exception("correlation ID validator failed; the client's value is refused")
            return False

    return accepts


#: The defaults: ``X-Correlation-ID``, UUIDv7, the module doc's rule.
DEFAULT_IDS = CorrelationIds()


def accept_or_mint(
    scope: Scope, client_values: Sequence[bytes], traceparents: Sequence[bytes] = ()
) -> tuple[str, tuple[bytes, bytes]]:
    """:meth:`CorrelationIds.accept_or_mint` with the defaults (``X-Correlation-ID``, UUIDv7)."""
    return DEFAULT_IDS.accept_or_mint(scope, client_values, traceparents)


def log_access(scope: Scope, status: int, started: float) -> None:
    """The access-log line of one request (status 0: no response was started)."""
    duration_ms = round((time.perf_counter() - started) * 1000, 3)
    method = scope.get("method", "WEBSOCKET") if scope["type"] == "http" else "WEBSOCKET"
    client = scope.get("client")
    access_logger.info(
        "%s %s %s",
        method,
        scope.get("path", ""),
        status or "-",
        extra={
            "method": method,
            "path": scope.get("path", ""),
            "status": status or None,
            "duration_ms": duration_ms,
            "client": client[0] if client else None,
        },
    )


class CorrelationIdMiddleware:
    """Pure-ASGI layer: accept or mint the ID, bind it, echo it, and write the access-log line.

    ``header``, ``generator`` and ``validator`` are :class:`CorrelationIds`' (defaults: the
    ``X-Correlation-ID`` header, UUIDv7, the module doc's rule); error bodies carry the ID as
    ``correlation_id`` whatever the header is called.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        header: str = HEADER,
        generator: Generator | None = None,
        validator: Validator | None = None,
        access_log: bool = True,
    ) -> None:
        self.app = app
        self.access_log = access_log
        self.ids = CorrelationIds(header, generator=generator, validator=validator)
        self.header = self.ids.header
        self.header_key = self.ids.key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope_type = scope["type"]
        if scope_type not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        header_key = self.header_key
        client_values = []
        traceparents = []
        for name, value in scope["headers"]:
            lowered = name.lower()
            if lowered == header_key:
                client_values.append(value)
            elif lowered == TRACEPARENT_KEY:
                traceparents.append(value)
        correlation_id, header = self.ids.accept_or_mint(scope, client_values, traceparents)
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            message_type = message["type"]
            if message_type in RESPONSE_START_TYPES or message_type == "websocket.accept":
                headers = message.get("headers") or ()
                if any(name.lower() == header_key for name, _ in headers):  # set, never append
                    headers = [h for h in headers if h[0].lower() != header_key]
                message["headers"] = [*headers, header]
                status = message.get("status", 101)
                if annotate_span is not None:
                    annotate_span(header[1])
            elif message_type == "websocket.close" and not status:
                status = 403  # closed before accept: the server answers the handshake with 403
            await send(message)

        token = correlation_id_var.set(correlation_id)
        logging_access = self.access_log and access_logger.isEnabledFor(logging.INFO)
        started = time.perf_counter() if logging_access else 0.0
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if logging_access:
                log_access(scope, status, started)
            correlation_id_var.reset(token)


# -- outgoing calls -------------------------------------------------------------------------


def correlation_headers(header: str = HEADER) -> dict[str, str]:
    """The headers an outgoing call of the current request carries: ``{header: id}`` and, when
    the request brought a valid ``traceparent`` (or an OpenTelemetry span is current), the
    ``traceparent`` of a child call; ``{}`` outside a request (``header``: the configured one)."""
    correlation_id = correlation_id_var.get()
    if not correlation_id:
        return {}
    headers = {header: correlation_id}
    _add_trace_context(headers)
    return headers


def _add_trace_context(headers: Any) -> None:
    """Set ``traceparent`` (and ``tracestate``) in ``headers`` unless already there."""
    if "traceparent" in headers:
        return
    if _otel_inject is not None:
        _otel_inject(headers)
        if "traceparent" in headers:
            return
    trace_parent = trace_parent_var.get()
    if trace_parent is not None:
        headers["traceparent"] = trace_parent.child()


def _otel_injector() -> Callable[[Any], None] | None:
    """With OpenTelemetry installed: its propagator (W3C by default), for the current span."""
    if not _OPENTELEMETRY:
        return None

    def inject(headers: Any) -> None:
        trace, propagate = _opentelemetry()
        if trace.get_current_span().get_span_context().is_valid:
            propagate.inject(headers)

    return inject


_otel_inject = _otel_injector()


def _header_setter(header: str) -> Callable[[httpx.Request], None]:
    def set_header(request: httpx.Request) -> None:
        correlation_id = correlation_id_var.get()
        if not correlation_id:
            return
        if header not in request.headers:
            request.headers[header] = correlation_id
        _add_trace_context(request.headers)

    return set_header


def propagate_correlation_id(client: httpx.Client | httpx.AsyncClient, header: str = HEADER) -> Any:
    """Make ``client`` send the current correlation ID on every request (unless one is set), in
    ``header`` (pass the configured correlation header when it is not ``X-Correlation-ID``), and
    the trace context (``traceparent``) of the current request, as :func:`correlation_headers`.

    Adds a request event hook, so the ID is read when each request is sent — the same
    long-lived client serves every request of the service. Returns the client.
    """
    import httpx

    set_header = _header_setter(header)

    async def set_header_async(request: httpx.Request) -> None:
        set_header(request)

    hook: Any = set_header_async if isinstance(client, httpx.AsyncClient) else set_header
    hooks = client.event_hooks
    hooks["request"] = [*hooks.get("request", []), hook]
    client.event_hooks = hooks
    return client
