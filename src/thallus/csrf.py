"""CSRF protection by origin evidence, for cookie-authenticated requests (docs/design.md §5).

The decision is :func:`csrf_verdict`, a pure function; :class:`CSRFMiddleware` only gathers its
inputs from the ASGI scope and answers a refusal.

A request is **checked** when its method is not ``GET``, ``HEAD`` or ``OPTIONS`` (exact, so a
lower-case ``patch`` is checked), it carries at least one cookie, and no earlier layer verified an
API key for it (:func:`mark_api_key_authenticated`). A checked request **passes** when:

1. ``Sec-Fetch-Site`` is ``same-origin`` or ``none`` (a user-initiated navigation) — the browser's
   own statement, which a page cannot forge;
2. else its ``Origin`` equals the service's public origin or an allowlisted origin; ``Origin: null``
   or any other value is refused. ``same-site`` and ``cross-site`` never pass on their own: a
   sibling subdomain is not trusted unless listed (OWASP Fetch Metadata guidance);
3. else (no ``Origin``) its ``Referer`` has a trusted origin; any other Referer is refused;
4. else, with no evidence at all, it is refused in ``test`` and ``production`` and passes in
   ``development`` (curl and scripts send none of these headers). A ``Sec-Fetch-Site`` that is
   present but not ``same-origin``/``none`` *is* evidence — of a browser — so without ``Origin`` or
   ``Referer`` that request is refused in every environment.

Trusted origins come from configuration, never from the ``Host`` header; a pattern
``https://*.example.com`` trusts exactly the origins it lets through CORS
(:class:`~thallus.origins.OriginMatcher`). Headers sent more than once are joined (``a, b``),
which can never equal a trusted origin or ``same-origin``: fail closed. WebSocket handshakes
carrying cookies are checked the same way (cross-site WebSocket hijacking: browsers send cookies
and CORS never applies) and refused before they are accepted.

**Exempt paths** (``exempt_paths``) are never checked: a webhook that authenticates its sender
by its own signature and receives no browser traffic. The match is exact — ``scope["path"]``
equal to a listed path, no prefix, no pattern — the narrow end of Go's
``CrossOriginProtection.AddInsecureBypassPattern``: an exemption can never grow to cover a route
added later under the same prefix.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias

from thallus._asgi import ASGIApp, Receive, Scope, Send, scope_state
from thallus.audit import AuditEvent, AuditSink, request_fields
from thallus.errors import JSON_CONTENT_TYPE, error_body, send_error
from thallus.origins import OriginMatcher, origin_of_url, parse_origins, request_origin_key

logger = logging.getLogger("thallus.csrf")

Environment = Literal["development", "test", "production"]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: The method passed for a WebSocket handshake: never safe, so cookie-bearing handshakes are checked.
WEBSOCKET_HANDSHAKE = "WEBSOCKET"

#: ``scope["state"]`` key an authentication layer sets to ``True`` once it has *verified* an API
#: key for the request. Presence of an ``X-API-Key`` header alone never exempts (saltcorn #4083).
API_KEY_AUTHENTICATED_STATE_KEY = "thallus_api_key_authenticated"

# Reasons, shared by logs, audit records, error details and tests (Django's convention).
EXEMPT_SAFE_METHOD = "safe method"
EXEMPT_NO_COOKIES = "no cookies"
EXEMPT_API_KEY = "authenticated by API key"
EXEMPT_PATH = "exempt path"
PASS_FETCH_METADATA = "Sec-Fetch-Site is same-origin or none"
PASS_TRUSTED_ORIGIN = "Origin is trusted"
PASS_TRUSTED_REFERER = "Referer is trusted"
PASS_NO_EVIDENCE_DEVELOPMENT = "no origin evidence (allowed in development)"
REJECT_NULL_ORIGIN = "Origin is null"
REJECT_UNTRUSTED_ORIGIN = "Origin is not a trusted origin"
REJECT_UNTRUSTED_REFERER = "Referer is not from a trusted origin"
REJECT_CROSS_SITE_NO_ORIGIN = "Sec-Fetch-Site is not same-origin and there is no Origin or Referer"
REJECT_NO_EVIDENCE = "no Sec-Fetch-Site, Origin or Referer header"

_ALLOWING_FETCH_SITES = frozenset({"same-origin", "none"})


@dataclass(frozen=True, slots=True)
class CsrfVerdict:
    """The outcome of :func:`csrf_verdict`: ``allowed`` and one of the reason constants."""

    allowed: bool
    reason: str
    checked: bool = True


#: One immutable verdict per reason, made once.
_VERDICTS = {
    reason: CsrfVerdict(allowed, reason, checked)
    for allowed, reason, checked in (
        (True, EXEMPT_SAFE_METHOD, False),
        (True, EXEMPT_NO_COOKIES, False),
        (True, EXEMPT_API_KEY, False),
        (True, EXEMPT_PATH, False),
        (True, PASS_FETCH_METADATA, True),
        (True, PASS_TRUSTED_ORIGIN, True),
        (True, PASS_TRUSTED_REFERER, True),
        (True, PASS_NO_EVIDENCE_DEVELOPMENT, True),
        (False, REJECT_NULL_ORIGIN, True),
        (False, REJECT_UNTRUSTED_ORIGIN, True),
        (False, REJECT_UNTRUSTED_REFERER, True),
        (False, REJECT_CROSS_SITE_NO_ORIGIN, True),
        (False, REJECT_NO_EVIDENCE, True),
    )
}


#: What :func:`csrf_verdict` trusts: an :class:`OriginMatcher`, or canonical origins (patterns
#: included) from which one is made and remembered.
TrustedOrigins: TypeAlias = OriginMatcher | frozenset[str]


@functools.lru_cache(maxsize=32)
def _matcher_of(origins: frozenset[str]) -> OriginMatcher:
    return OriginMatcher(origins)


def csrf_verdict(
    method: str,
    *,
    has_cookies: bool,
    api_key_authenticated: bool,
    sec_fetch_site: str | None,
    origin: str | None,
    referer: str | None,
    environment: Environment,
    trusted_origins: TrustedOrigins,
) -> CsrfVerdict:
    """Decide one request (module doc, rules 1–4). ``trusted_origins`` are canonical (lower-case):
    an :class:`OriginMatcher`, or a frozenset of canonical origins and patterns."""
    if not isinstance(trusted_origins, OriginMatcher):
        trusted_origins = _matcher_of(frozenset(trusted_origins))  # a frozenset: itself, no copy
    verdicts = _VERDICTS
    if method in SAFE_METHODS:
        return verdicts[EXEMPT_SAFE_METHOD]
    if not has_cookies:
        return verdicts[EXEMPT_NO_COOKIES]
    if api_key_authenticated:
        return verdicts[EXEMPT_API_KEY]
    if sec_fetch_site is not None and sec_fetch_site.strip().lower() in _ALLOWING_FETCH_SITES:
        return verdicts[PASS_FETCH_METADATA]
    if origin is not None:
        if origin.strip().lower() == "null":
            return verdicts[REJECT_NULL_ORIGIN]
        trusted = request_origin_key(origin) in trusted_origins
        return verdicts[PASS_TRUSTED_ORIGIN if trusted else REJECT_UNTRUSTED_ORIGIN]
    if referer is not None:
        trusted = origin_of_url(referer) in trusted_origins
        return verdicts[PASS_TRUSTED_REFERER if trusted else REJECT_UNTRUSTED_REFERER]
    if sec_fetch_site is not None:
        return verdicts[REJECT_CROSS_SITE_NO_ORIGIN]
    return verdicts[PASS_NO_EVIDENCE_DEVELOPMENT if environment == "development" else REJECT_NO_EVIDENCE]


def login_csrf_verdict(
    *, sec_fetch_site: str | None, origin: str | None, referer: str | None, trusted_origins: TrustedOrigins
) -> CsrfVerdict:
    """Login CSRF (§5): a login or registration carries no session cookie yet, so the cookie rule
    never applies; instead, a request whose headers say it is cross-origin must name a trusted
    origin. Non-browser clients, which send none of these headers, pass in every environment.
    """
    return csrf_verdict(
        "POST",
        has_cookies=True,
        api_key_authenticated=False,
        sec_fetch_site=sec_fetch_site,
        origin=origin,
        referer=referer,
        environment="development",  # "no evidence" passes: only cross-origin evidence matters here
        trusted_origins=trusted_origins,
    )


def has_cookie(cookie_header: str) -> bool:
    """Whether a ``Cookie`` value carries at least one cookie (any non-blank ``;``-separated pair).

    Deliberately generous: a malformed pair still counts, so garbage is checked, never exempt.
    """
    return bool(cookie_header.replace(";", " ").strip())  # some character is neither ";" nor blank


def mark_api_key_authenticated(scope: Scope) -> None:
    """Called by an authentication layer after it has verified the request's API key."""
    scope_state(scope)[API_KEY_AUTHENTICATED_STATE_KEY] = True


#: The request headers :func:`csrf_verdict` reads (lower-case).
EVIDENCE_HEADERS = frozenset({b"cookie", b"sec-fetch-site", b"origin", b"referer"})


def _joined(values: Sequence[bytes] | None) -> str | None:
    if not values:
        return None
    return values[0].decode("latin-1") if len(values) == 1 else b", ".join(values).decode("latin-1")


#: What a refusal hook returns: an ASGI application that answers the refused request (a Starlette
#: ``Response`` is one), or ``None`` for the default JSON 403.
RefusalResponse: TypeAlias = ASGIApp | None
#: ``on_refusal(scope, reason)``, sync or async; ``reason`` is one of the ``REJECT_*`` constants.
RefusalHook: TypeAlias = Callable[[Scope, str], RefusalResponse | Awaitable[RefusalResponse]]


def exempt_path_set(paths: Iterable[str]) -> frozenset[str]:
    """``exempt_paths`` checked: each an exact path, starting with ``/``, with no wildcard,
    query or fragment (the match is exact, so one of those could never match what it means)."""
    checked = []
    for path in paths:
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError(f"exempt_paths: {path!r} must start with '/'")
        if any(char in path for char in "*?#"):
            raise ValueError(f"exempt_paths: {path!r}: exact paths only (no wildcard, query or fragment)")
        checked.append(path)
    return frozenset(checked)


class CSRFMiddleware:
    """Pure-ASGI wrapper around :func:`csrf_verdict`; refusals are JSON 403 ``CSRFError``.

    ``trusted_origins`` may hold ``https://*.example.com`` patterns; ``exempt_paths`` are exact
    paths never checked (module doc). ``on_refusal(scope, reason)`` — a function or a coroutine
    function — may answer a refused HTTP request itself: it returns an ASGI application (a Starlette
    ``Response``, say), which is called with the request, or ``None`` for the default §8 JSON 403.
    The refusal is logged and audited first either way, and the application is never reached.
    Under :func:`~thallus.protect` the error boundary still turns an error status that is not JSON
    into the §8 shape (every error is JSON there): return JSON for a 4xx, or e.g. a redirect.
    WebSocket handshakes always get the standard denial (the hook is not called for them).
    """

    def __init__(
        self,
        app: ASGIApp,
        trusted_origins: Iterable[str],
        *,
        environment: Environment = "production",
        exempt_paths: Iterable[str] = (),
        on_refusal: RefusalHook | None = None,
        audit: AuditSink | None = None,
    ) -> None:
        if on_refusal is not None and not callable(on_refusal):
            raise TypeError("on_refusal must be a callable taking (scope, reason)")
        self.app = app
        self.trusted_origins = OriginMatcher(parse_origins(list(trusted_origins), patterns=True))
        self.environment: Environment = environment
        self.exempt_paths = exempt_path_set(exempt_paths)
        self.on_refusal = on_refusal
        self.audit = audit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope_type = scope["type"]
        if scope_type == "http":
            method = scope["method"]
            if method in SAFE_METHODS:
                await self.app(scope, receive, send)
                return
        elif scope_type == "websocket":
            method = WEBSOCKET_HANDSHAKE
        else:
            await self.app(scope, receive, send)
            return
        verdict = self.verdict(scope, method)
        if verdict.allowed:
            await self.app(scope, receive, send)
        else:
            await self.refuse(scope, receive, send, method, verdict)

    def verdict(self, scope: Scope, method: str) -> CsrfVerdict:
        if self.exempt_paths and scope.get("path") in self.exempt_paths:
            return _VERDICTS[EXEMPT_PATH]
        evidence: dict[bytes, list[bytes]] = {}
        for name, value in scope["headers"]:
            key = name.lower()
            if key in EVIDENCE_HEADERS:
                evidence.setdefault(key, []).append(value)
        return self.verdict_from(method, evidence, scope.get("state"))

    def verdict_from(
        self,
        method: str,
        evidence: Mapping[bytes, Sequence[bytes]],
        state: Mapping[str, object] | None,
        path: str | None = None,
    ) -> CsrfVerdict:
        """The verdict from ``evidence``: the request's values of :data:`EVIDENCE_HEADERS`, by name;
        ``path`` (the scope's) is exempt when listed in :attr:`exempt_paths`."""
        if path is not None and self.exempt_paths and path in self.exempt_paths:
            return _VERDICTS[EXEMPT_PATH]
        has_cookies = False
        for value in evidence.get(b"cookie", ()):
            if has_cookie(value.decode("latin-1")):
                has_cookies = True
                break
        api_key_authenticated = state is not None and state.get(API_KEY_AUTHENTICATED_STATE_KEY) is True
        exempt = method in SAFE_METHODS or not has_cookies or api_key_authenticated
        return csrf_verdict(
            method,
            has_cookies=has_cookies,
            api_key_authenticated=api_key_authenticated,
            # an exempt request's origin evidence is never read: skip decoding it
            sec_fetch_site=None if exempt else _joined(evidence.get(b"sec-fetch-site")),
            origin=None if exempt else _joined(evidence.get(b"origin")),
            referer=None if exempt else _joined(evidence.get(b"referer")),
            environment=self.environment,
            trusted_origins=self.trusted_origins,
        )

    async def refuse(self, scope: Scope, receive: Receive, send: Send, method: str, verdict: CsrfVerdict) -> None:
        """Log, audit and answer a refused request (a JSON 403, or a refused WebSocket handshake)."""
        details = {"reason": verdict.reason, "origin": _offending_origin(scope)}
        logger.warning(
            "CSRF check refused %s %s: %s", method, scope.get("path", ""), verdict.reason, extra={"csrf": details}
        )
        if self.audit is not None:
            fields = request_fields(scope)
            fields["method"] = method
            self.audit.record(
                AuditEvent(action="csrf_rejected", outcome="denied", status_code=403, details=details, **fields)
            )
        message = "Cross-site request refused: " + verdict.reason + "."
        if scope["type"] == "http":
            if self.on_refusal is not None:
                response = self.on_refusal(scope, verdict.reason)
                if inspect.isawaitable(response):
                    response = await response
                if response is not None:
                    await response(scope, receive, send)
                    return
            await send_error(send, 403, error="CSRFError", message=message, details=details)
        else:
            await _deny_websocket(scope, receive, send, error_body("CSRFError", message, details))


def _offending_origin(scope: Scope) -> str | None:
    """What to name in logs and audit records: the Origin, else only the Referer's origin — a
    Referer's path and query may carry tokens and must not be copied into records."""
    referer = None
    key: bytes
    value: bytes
    for key, value in scope["headers"]:
        name = key.lower()
        if name == b"origin":
            return value.decode("latin-1")[:200]
        if name == b"referer" and referer is None:
            referer = value.decode("latin-1")
    if referer is None:
        return None
    return origin_of_url(referer) or "(malformed Referer)"


async def _deny_websocket(scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
    """Refuse a handshake before accepting it: a 403 JSON response where the server supports the
    denial-response extension, otherwise a close, which the server turns into HTTP 403."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    if "websocket.http.response" in scope.get("extensions", {}):
        headers = [JSON_CONTENT_TYPE, (b"content-length", str(len(body)).encode())]
        await send({"type": "websocket.http.response.start", "status": 403, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008})
