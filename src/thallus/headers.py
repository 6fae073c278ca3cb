"""Security headers on every response, whoever produced it (docs/design.md §3).

The header set is a composition of small builders, each validating its input once at
start-up (helmet's design): Content-Security-Policy, Permissions-Policy, HSTS and the fixed
headers. :class:`HeaderPolicy` renders them to bytes once; per response the layer only drops
the application's headers of the same names and appends the precomputed list, so a header
is never duplicated and the layer's value wins.

A route that needs something else says so explicitly through :func:`override_header` (or asks
for a CSP nonce with :func:`csp_nonce` when it renders HTML); an application header alone never
silently replaces policy — secure.py's overwrite model made that impossible, Django's
setdefault model made it accidental; explicit is the middle road.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from thallus._asgi import RESPONSE_START_TYPES, ASGIApp, Message, RawHeaders, Receive, Scope, Send, scope_state

if TYPE_CHECKING:
    from thallus.settings import Settings

# -- Content-Security-Policy -------------------------------------------------------------------

#: The same-origin baseline of docs/design.md §3.
BASELINE_CSP: Mapping[str, tuple[str, ...]] = {
    "default-src": ("'self'",),
    "object-src": ("'none'",),
    "base-uri": ("'self'",),
    "frame-ancestors": ("'none'",),
    "form-action": ("'self'",),
}

#: Directives whose value is a source list (CSP Level 3 §6); extras may be configured for these.
SOURCE_LIST_DIRECTIVES = frozenset(
    {
        "default-src", "script-src", "script-src-elem", "script-src-attr", "style-src", "style-src-elem",
        "style-src-attr", "img-src", "font-src", "connect-src", "media-src", "object-src", "frame-src",
        "child-src", "worker-src", "manifest-src", "base-uri", "form-action", "frame-ancestors",
    }
)  # fmt: skip

_QUOTED_KEYWORDS = frozenset(
    {
        "'self'", "'none'", "'unsafe-inline'", "'unsafe-eval'", "'strict-dynamic'", "'unsafe-hashes'",
        "'wasm-unsafe-eval'", "'report-sample'", "'inline-speculation-rules'",
    }
)  # fmt: skip
_BARE_KEYWORDS = frozenset(keyword.strip("'") for keyword in _QUOTED_KEYWORDS)
_HASH_SOURCE = re.compile(r"'sha(256|384|512)-[A-Za-z0-9+/_-]+={0,2}'")
_SCHEME_SOURCE = re.compile(r"[a-z][a-z0-9+.-]*:")
_HOST_SOURCE = re.compile(
    r"(?:[a-z][a-z0-9+.-]*://)?(?:\*|(?:\*\.)?[a-z0-9-]+(?:\.[a-z0-9-]+)*)(?::(?:[0-9]{1,5}|\*))?(?:/[^\s;,']*)?",
    re.IGNORECASE,
)
NONCE_PLACEHOLDER = "{nonce}"


def validate_csp_source(source: str) -> str:
    """Return ``source`` if it is a valid CSP source expression, else raise ``ValueError``."""
    if source in _QUOTED_KEYWORDS or _HASH_SOURCE.fullmatch(source):
        return source
    if source.lower() in _BARE_KEYWORDS:
        raise ValueError(f"CSP keyword {source!r} must be quoted: '{source.lower()}'")
    if source.startswith("'nonce-"):
        raise ValueError("nonces are minted per response (csp_nonce), never configured")
    if _SCHEME_SOURCE.fullmatch(source) or _HOST_SOURCE.fullmatch(source):
        return source
    raise ValueError(f"{source!r} is not a CSP source expression")


def parse_csp_sources(text: str) -> dict[str, tuple[str, ...]]:
    """Parse ``"img-src data:; connect-src https://api.example.com"`` into directive → sources."""
    directives: dict[str, tuple[str, ...]] = {}
    for part in text.split(";"):
        tokens = part.split()
        if not tokens:
            continue
        name, sources = tokens[0].lower(), tokens[1:]
        if name not in SOURCE_LIST_DIRECTIVES:
            raise ValueError(f"{tokens[0]!r} is not a CSP source-list directive")
        if name in directives:
            raise ValueError(f"directive {name!r} is given twice")
        if not sources:
            raise ValueError(f"directive {name!r} has no sources")
        directives[name] = tuple(validate_csp_source(source) for source in sources)
    return directives


@dataclass(frozen=True)
class ContentSecurityPolicy:
    """An ordered CSP, built on :data:`BASELINE_CSP` plus configured extra sources."""

    directives: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(BASELINE_CSP))

    def with_sources(self, extra: Mapping[str, Sequence[str]]) -> ContentSecurityPolicy:
        """Add sources per directive. A new fetch directive starts from ``'self'``; extras replace ``'none'``."""
        merged = dict(self.directives)
        for name, sources in extra.items():
            base = merged.get(name, ("'self'",))
            if base == ("'none'",):
                base = ()
            merged[name] = tuple(dict.fromkeys((*base, *sources)))
        return ContentSecurityPolicy(merged)

    def with_nonce_placeholder(self) -> ContentSecurityPolicy:
        """The policy with ``'nonce-{nonce}'`` in script-src and style-src, for HTML responses."""
        nonce = f"'nonce-{NONCE_PLACEHOLDER}'"
        fallback = self.directives.get("default-src", ("'self'",))
        merged = dict(self.directives)
        for name in ("script-src", "style-src"):
            merged[name] = (*merged.get(name, fallback), nonce)
        return ContentSecurityPolicy(merged)

    def render(self, report_uri: str | None = None) -> str:
        parts = [" ".join((name, *sources)) for name, sources in self.directives.items()]
        if report_uri:
            parts.append(f"report-uri {report_uri}")
            parts.append(f"report-to {CSP_REPORT_GROUP}")
        return "; ".join(parts)


CSP_REPORT_GROUP = "thallus-csp"


def validate_report_uri(value: str) -> str:
    """A violation-report URI: an absolute http(s) URL or a path starting with ``/``."""
    value = value.strip()
    if not re.fullmatch(r"(https?://[^\s;,\"]+|/[^\s;,\"]*)", value):
        raise ValueError(f"{value!r} is not an http(s) URL or an absolute path")
    return value


# -- Permissions-Policy ------------------------------------------------------------------------

#: Powerful features a JSON API never uses, camera and microphone first (the page's order).
#: Only names Chromium recognises, so browsers log no "unrecognised feature" noise.
DISABLED_FEATURES = (
    "camera", "microphone", "geolocation", "payment", "usb", "accelerometer", "autoplay", "bluetooth",
    "display-capture", "encrypted-media", "fullscreen", "gyroscope", "hid", "idle-detection", "magnetometer",
    "midi", "picture-in-picture", "publickey-credentials-get", "screen-wake-lock", "serial",
    "xr-spatial-tracking", "browsing-topics",
)  # fmt: skip

_PERMISSIONS_ITEM = re.compile(r'[a-z][a-z0-9-]*=(\*|\(\)|\((?:self|src|"[^"\s]+")(?: (?:self|src|"[^"\s]+"))*\)|self)')


def build_permissions_policy(disabled: Iterable[str] = DISABLED_FEATURES) -> str:
    """``camera=(), microphone=(), …`` — an empty allowlist disables a feature everywhere."""
    return ", ".join(f"{feature}=()" for feature in disabled)


def validate_permissions_policy(value: str) -> str:
    """Check a full Permissions-Policy value (structured-field dictionary); empty turns it off."""
    value = value.strip()
    for item in filter(None, (part.strip() for part in value.split(","))):
        if not _PERMISSIONS_ITEM.fullmatch(item):
            raise ValueError(f"{item!r} is not feature=(allowlist), e.g. camera=() or fullscreen=(self)")
    return value


# -- other headers ---------------------------------------------------------------------------

REFERRER_POLICY_TOKENS = frozenset(
    {
        "no-referrer", "no-referrer-when-downgrade", "origin", "origin-when-cross-origin", "same-origin",
        "strict-origin", "strict-origin-when-cross-origin", "unsafe-url",
    }
)  # fmt: skip

_ISOLATION_VALUES = {
    "cross_origin_opener_policy": frozenset(
        {"same-origin", "same-origin-allow-popups", "noopener-allow-popups", "unsafe-none"}
    ),
    "cross_origin_resource_policy": frozenset({"same-origin", "same-site", "cross-origin"}),
    # HTML §7.1.4 (COEP): opt-in, since require-corp/credentialless block cross-origin embeds lacking CORP/CORS
    "cross_origin_embedder_policy": frozenset({"require-corp", "credentialless", "unsafe-none"}),
    "x_permitted_cross_domain_policies": frozenset({"none", "master-only", "by-content-type", "all"}),
}
_OFF = ("", "off")


def validate_referrer_policy(value: str) -> str:
    """One token, or a comma-separated fallback list (W3C Referrer Policy §4.1)."""
    tokens = [token.strip().lower() for token in value.split(",")]
    for token in tokens:
        if token not in REFERRER_POLICY_TOKENS:
            raise ValueError(f"{token!r} is not a referrer policy")
    return ", ".join(tokens)


#: ``X-Frame-Options`` values (RFC 7034 §2.1; ``ALLOW-FROM`` is obsolete and ignored by browsers).
FRAME_OPTIONS = ("DENY", "SAMEORIGIN")


def validate_frame_options(value: str) -> str:
    """``DENY`` or ``SAMEORIGIN`` (any case), upper-cased."""
    normalised = value.strip().upper()
    if normalised not in FRAME_OPTIONS:
        raise ValueError(f"{value!r} is not DENY or SAMEORIGIN (X-Frame-Options, RFC 7034)")
    return normalised


def validate_isolation_value(setting: str, value: str) -> str:
    """COOP/COEP/CORP/X-Permitted-Cross-Domain-Policies value, or ``off`` (or empty) to omit the header."""
    value = value.strip().lower()
    if value in _OFF:
        return ""
    allowed = _ISOLATION_VALUES.get(setting)
    if allowed is None:
        raise ValueError(f"{setting!r} is not an isolation header setting")
    if value not in allowed:
        raise ValueError(f"{value!r} is not one of {', '.join(sorted(allowed))} or off")
    return value


def build_hsts(max_age: int, include_subdomains: bool = False, preload: bool = False) -> str:
    """RFC 6797 §6.1: ``max-age=N`` plus the opt-in directives."""
    value = f"max-age={max_age}"
    if include_subdomains:
        value += "; includeSubDomains"
    if preload:
        value += "; preload"
    return value


# -- the policy ------------------------------------------------------------------------------

#: Headers that leak implementation details; removed from every response (OWASP remove list).
LEAKY_HEADERS = frozenset({b"server", b"x-powered-by", b"x-aspnet-version", b"x-aspnetmvc-version"})
CACHE_CONTROL = b"cache-control"
NO_STORE = (CACHE_CONTROL, b"no-store")
CSP_HEADER = b"content-security-policy"
CSP_REPORT_ONLY_HEADER = b"content-security-policy-report-only"

#: ``scope["state"]`` keys of the per-route API below.
OVERRIDES_STATE_KEY = "thallus_header_overrides"
NONCE_STATE_KEY = "thallus_csp_nonce"


@dataclass(frozen=True)
class HeaderPolicy:
    """The rendered header set. Build it with :meth:`from_settings` or :meth:`build`."""

    headers: tuple[tuple[bytes, bytes], ...]
    no_store_paths: tuple[str, ...] = ()
    csp_header: bytes | None = None
    csp_nonce_template: str | None = None
    managed: frozenset[bytes] = field(init=False)
    no_store_headers: tuple[tuple[bytes, bytes], ...] = field(init=False, repr=False)
    no_store_managed: frozenset[bytes] = field(init=False, repr=False)
    _plain_selection: tuple[frozenset[bytes], tuple[tuple[bytes, bytes], ...]] = field(init=False, repr=False)
    _no_store_selection: tuple[frozenset[bytes], tuple[tuple[bytes, bytes], ...]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        managed = frozenset(name for name, _ in self.headers) | LEAKY_HEADERS | {CSP_HEADER, CSP_REPORT_ONLY_HEADER}
        object.__setattr__(self, "managed", managed)
        object.__setattr__(self, "no_store_headers", (*self.headers, NO_STORE))
        object.__setattr__(self, "no_store_managed", managed | {CACHE_CONTROL})
        object.__setattr__(self, "_plain_selection", (managed, self.headers))
        object.__setattr__(self, "_no_store_selection", (self.no_store_managed, self.no_store_headers))

    @classmethod
    def build(
        cls,
        *,
        hsts: str | None = None,
        xss_protection: str = "1; mode=block",
        x_frame_options: str = "DENY",
        referrer_policy: str = "strict-origin-when-cross-origin",
        permissions_policy: str | None = None,
        csp: ContentSecurityPolicy | None = None,
        csp_report_only: bool = False,
        csp_report_uri: str | None = None,
        cross_origin_opener_policy: str = "same-origin",
        cross_origin_resource_policy: str = "same-site",
        cross_origin_embedder_policy: str | None = None,
        x_permitted_cross_domain_policies: str = "none",
        no_store_paths: Sequence[str] = (),
    ) -> HeaderPolicy:
        """Render a policy; ``None`` or ``""`` for an optional header leaves it out.

        ``x_frame_options`` is ``DENY`` or ``SAMEORIGIN``; with ``SAMEORIGIN`` a CSP whose
        ``frame-ancestors`` is the baseline ``'none'`` gets ``'self'`` instead, so the two headers
        say the same (browsers that know CSP obey ``frame-ancestors`` and ignore
        ``X-Frame-Options``: CSP Level 3 §6.4.2). Cross-Origin-Embedder-Policy is sent only when
        given (``require-corp`` or ``credentialless``), since it blocks cross-origin embeds that
        carry no CORP or CORS.
        """
        x_frame_options = validate_frame_options(x_frame_options)
        if cross_origin_embedder_policy:
            cross_origin_embedder_policy = validate_isolation_value(
                "cross_origin_embedder_policy", cross_origin_embedder_policy
            )
        if csp is not None and x_frame_options == "SAMEORIGIN" and csp.directives.get("frame-ancestors") == ("'none'",):
            csp = ContentSecurityPolicy({**csp.directives, "frame-ancestors": ("'self'",)})
        csp_header = CSP_REPORT_ONLY_HEADER if csp_report_only else CSP_HEADER
        if permissions_policy is None:
            permissions_policy = build_permissions_policy()
        values: list[tuple[str, str | None]] = [
            ("x-content-type-options", "nosniff"),
            ("x-frame-options", x_frame_options),
            ("x-xss-protection", xss_protection),
            ("referrer-policy", validate_referrer_policy(referrer_policy)),
            ("strict-transport-security", hsts),
            ("permissions-policy", validate_permissions_policy(permissions_policy)),
            (csp_header.decode(), csp.render(csp_report_uri) if csp else None),
            ("reporting-endpoints", f'{CSP_REPORT_GROUP}="{csp_report_uri}"' if csp and csp_report_uri else None),
            ("cross-origin-opener-policy", cross_origin_opener_policy),
            ("cross-origin-embedder-policy", cross_origin_embedder_policy),
            ("cross-origin-resource-policy", cross_origin_resource_policy),
            ("x-permitted-cross-domain-policies", x_permitted_cross_domain_policies),
        ]
        rendered = tuple((name.encode(), value.encode("latin-1")) for name, value in values if value)
        nonce_template = csp.with_nonce_placeholder().render(csp_report_uri) if csp else None
        return cls(rendered, tuple(no_store_paths), csp_header if csp else None, nonce_template)

    @classmethod
    def from_settings(cls, settings: Settings) -> HeaderPolicy:
        csp = None
        if settings.csp_enabled:
            csp = ContentSecurityPolicy().with_sources(parse_csp_sources(settings.csp_extra_sources))
        return cls.build(
            hsts=build_hsts(settings.hsts_max_age, settings.hsts_include_subdomains, settings.hsts_preload)
            if settings.hsts_enabled
            else None,
            xss_protection=settings.xss_protection,
            x_frame_options=settings.x_frame_options,
            referrer_policy=settings.referrer_policy,
            permissions_policy=settings.permissions_policy,
            csp=csp,
            csp_report_only=settings.csp_report_only,
            csp_report_uri=settings.csp_report_uri,
            cross_origin_opener_policy=settings.cross_origin_opener_policy,
            cross_origin_resource_policy=settings.cross_origin_resource_policy,
            cross_origin_embedder_policy=settings.cross_origin_embedder_policy,
            x_permitted_cross_domain_policies=settings.x_permitted_cross_domain_policies,
            no_store_paths=settings.no_store_paths,
        )

    def apply(self, headers: Iterable[tuple[bytes, bytes]], status: int, scope: Scope) -> RawHeaders:
        """The response headers with the application's managed ones replaced by the policy's."""
        managed, ours = self.select(status, scope)
        result = [(name, value) for name, value in headers if name.lower() not in managed]
        result.extend(ours)
        return result

    def select(self, status: int, scope: Scope) -> tuple[frozenset[bytes], tuple[tuple[bytes, bytes], ...]]:
        """The names this response's policy replaces, and the headers it sets: :attr:`headers`, or
        :attr:`no_store_headers` for errors and ``no_store_paths``, or a per-route variant."""
        if status >= 400 or (self.no_store_paths and scope["path"].startswith(self.no_store_paths)):
            selected = self._no_store_selection
        else:
            selected = self._plain_selection
        state = scope.get("state")
        if state and (OVERRIDES_STATE_KEY in state or NONCE_STATE_KEY in state):
            return self._per_route(state, *selected)
        return selected

    def _per_route(
        self, state: Mapping[str, object], managed: frozenset[bytes], ours: tuple[tuple[bytes, bytes], ...]
    ) -> tuple[frozenset[bytes], tuple[tuple[bytes, bytes], ...]]:
        nonce = state.get(NONCE_STATE_KEY)
        if isinstance(nonce, str) and self.csp_nonce_template and self.csp_header:
            value = self.csp_nonce_template.replace(NONCE_PLACEHOLDER, nonce).encode("latin-1")
            ours = tuple((name, value) if name == self.csp_header else (name, v) for name, v in ours)
        overrides = state.get(OVERRIDES_STATE_KEY)
        if isinstance(overrides, dict) and overrides:
            ours = tuple(header for header in ours if header[0] not in overrides)
            ours += tuple((name, value) for name, value in overrides.items() if value is not None)
            managed = managed | frozenset(overrides)
        return managed, ours


# -- per-route API ---------------------------------------------------------------------------


def override_header(scope: Scope, name: str, value: str | None) -> None:
    """Make this response carry ``name: value`` instead of the policy's value (``None``: omit it).

    Call from a route with ``request.scope``. This is the only way an application changes a
    managed header; e.g. ``override_header(request.scope, "X-Frame-Options", "SAMEORIGIN")``.
    """
    encoded = value.encode("latin-1") if value is not None else None
    if encoded is not None and (b"\r" in encoded or b"\n" in encoded or b"\0" in encoded):
        raise ValueError("header values must not contain CR, LF or NUL")
    overrides = scope_state(scope).setdefault(OVERRIDES_STATE_KEY, {})
    overrides[name.lower().encode("latin-1")] = encoded


def csp_nonce(scope: Scope) -> str:
    """A fresh nonce for this response, added to its CSP's script-src and style-src.

    Minted on first use only (like Django's ``LazyNonce``), so JSON responses pay nothing.
    Put it in the HTML: ``<script nonce="…">``.
    """
    state = scope_state(scope)
    nonce = state.get(NONCE_STATE_KEY)
    if not isinstance(nonce, str):
        nonce = secrets.token_urlsafe(18)
        state[NONCE_STATE_KEY] = nonce
    return nonce


# -- the layer -------------------------------------------------------------------------------


class SecurityHeadersMiddleware:
    """Pure-ASGI layer adding the policy's headers to every response start (HTTP and WebSocket denials)."""

    def __init__(self, app: ASGIApp, policy: HeaderPolicy | None = None) -> None:
        self.app = app
        self.policy = policy or HeaderPolicy.build(csp=ContentSecurityPolicy())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        policy = self.policy

        async def send_with_headers(message: Message) -> None:
            if message["type"] in RESPONSE_START_TYPES:
                message["headers"] = policy.apply(message.get("headers", ()), message["status"], scope)
            await send(message)

        await self.app(scope, receive, send_with_headers)
