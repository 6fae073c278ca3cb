"""Web origins: strict parsing of configured origins, and origin extraction from requests.

A configured origin must be exactly ``scheme://host[:port]`` (RFC 6454 §6.2 serialisation):
http or https, no userinfo, path, query, fragment, wildcard or ``null``. Anything else is
refused at start-up, never silently ignored (a trailing slash that never matches is the
classic misconfiguration; Go's ``AddTrustedOrigin`` and django-cors-headers refuse it too).

Where patterns are allowed (``parse_origins(..., patterns=True)``), one more form is accepted:
``scheme://*.name[:port]``, where ``*`` stands for exactly **one** DNS label (LDH, RFC 5890 §2.3.1;
A-labels ``xn--…`` included) and ``name`` has at least two labels. So ``https://*.example.com``
trusts ``https://app.example.com`` but neither ``https://a.b.example.com`` (a deeper name may be
delegated to someone else) nor ``https://example.com``; the port must be as written. Every other
wildcard (``*``, ``https://*``, ``https://a*.example.com``, ``https://*.*.example.com``,
``https://*.com``) is refused: a pattern over a top-level name trusts the whole registry.

Request values are compared as exact strings after lower-casing ASCII letters, so a
look-alike (``https://app.example.com.evil.com``), userinfo trick (``https://app@evil``) or
non-canonical spelling (``https://app.example.com:443``) simply does not match.
:class:`OriginMatcher` is the one comparison CORS and CSRF share: a set look-up for exact
origins, patterns tried only when it misses.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

import idna

ALLOWED_SCHEMES = ("http", "https")

_SCHEME_SPLIT = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", re.DOTALL)
_HOST_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_PORT = re.compile(r"[1-9][0-9]{0,4}")
_PATTERN_SPLIT = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://\*\.(.*)", re.DOTALL)
#: The one label a pattern's ``*`` matches: letters, digits and inner hyphens (RFC 5890 §2.3.1 LDH),
#: 1–63 characters; never a dot, so exactly one label.
_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_LDH_LABEL_BYTES = re.compile(rb"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
#: What marks a canonical pattern (``parse_origin_pattern``'s output).
PATTERN_MARK = "://*."
#: Request origins a pattern matched that an :class:`OriginMatcher` remembers, at most (the label
#: is the client's choice, so the memory is bounded; past it, matching is only slower).
MATCHED_CACHE_SIZE = 1024


class InvalidOriginError(ValueError):
    """A configured origin is not ``scheme://host[:port]``; ``str()`` says why."""


def parse_origin(value: str) -> str:
    """Return the canonical form of a configured origin or raise :class:`InvalidOriginError`.

    Canonical: lower-case scheme and host, internationalised host names in their IDNA 2008
    A-label (punycode) form as browsers serialise them; an explicit port is kept as written, because a
    browser never sends a default port and comparison is exact (docs/design.md §4).
    """
    text = value.strip()
    if not text:
        raise InvalidOriginError("an empty origin")
    if text == "*" or "*" in text:
        raise InvalidOriginError(f"{text!r} is a wildcard; list every origin explicitly")
    if text.lower() == "null":
        raise InvalidOriginError("'null' is the origin of sandboxed and file pages and is never trusted")
    match = _SCHEME_SPLIT.fullmatch(text)
    if match is None:
        raise InvalidOriginError(f"{text!r} has no scheme; write it as https://host[:port]")
    scheme, rest = match.group(1).lower(), match.group(2)
    host, port = _check_authority(text, scheme, rest)
    return f"{scheme}://{host}" + (f":{port}" if port is not None else "")


def _check_authority(text: str, scheme: str, rest: str) -> tuple[str, str | None]:
    """The canonical host and the port of ``rest`` (what follows ``scheme://``); errors name ``text``."""
    if scheme not in ALLOWED_SCHEMES:
        raise InvalidOriginError(f"{text!r} has scheme {scheme!r}; only http and https are allowed")
    for char, what in (
        ("/", "a path"),
        ("?", "a query"),
        ("#", "a fragment"),
        ("@", "userinfo"),
        ("\\", "a backslash"),
    ):
        if char in rest:
            raise InvalidOriginError(f"{text!r} has {what}; an origin is scheme://host[:port] with nothing after it")
    if any(ch.isspace() for ch in rest):
        raise InvalidOriginError(f"{text!r} contains whitespace")
    return _split_host_port(text, rest)


def parse_origin_pattern(value: str) -> str:
    """The canonical form of a configured pattern ``scheme://*.name[:port]`` (module doc), or
    :class:`InvalidOriginError`.

    ``*`` must be the whole first label, the only wildcard, over a name of at least two labels
    that is not an IP address: ``https://*.com`` would trust every ``.com`` site, and a pattern
    over the last labels of an address (``https://*.0.0.1``) would trust addresses.
    """
    text = value.strip()
    match = _PATTERN_SPLIT.fullmatch(text)
    if match is None or "*" in match.group(2):
        raise InvalidOriginError(_wildcard_refusal(text))
    scheme, rest = match.group(1).lower(), match.group(2)
    if rest.startswith("["):
        raise InvalidOriginError(f"{text!r} is a wildcard over an IP address; list every origin explicitly")
    host, port = _check_authority(text, scheme, rest)
    labels = host.split(".")
    if len(labels) < 2:
        raise InvalidOriginError(
            f"{text!r} is a wildcard over the single-label name {host!r}, which would trust every site "
            "under it; a pattern needs a name of two or more labels, as in https://*.example.com"
        )
    if labels[-1].isdigit():
        raise InvalidOriginError(f"{text!r} is a wildcard over an IP address; list every origin explicitly")
    return f"{scheme}://*.{host}" + (f":{port}" if port is not None else "")


def _wildcard_refusal(text: str) -> str:
    return (
        f"{text!r} is a wildcard; only a whole leading label may be '*', once, as in "
        "https://*.example.com; otherwise list every origin explicitly"
    )


def is_origin_pattern(origin: str) -> bool:
    """Whether a canonical configured origin is a pattern (``scheme://*.name[:port]``)."""
    return PATTERN_MARK in origin


def _split_host_port(text: str, authority: str) -> tuple[str, str | None]:
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise InvalidOriginError(f"{text!r} has an unterminated IPv6 address")
        literal, after = authority[1:end], authority[end + 1 :]
        try:
            address = ipaddress.IPv6Address(literal)
        except ValueError:
            raise InvalidOriginError(f"{text!r} has an invalid IPv6 address") from None
        host = f"[{address.compressed}]"
        if after and not after.startswith(":"):
            raise InvalidOriginError(f"{text!r} has characters after the IPv6 address")
        port_text = after[1:] if after else None
    else:
        host_text, sep, port_text_or_empty = authority.rpartition(":")
        if not sep:
            host_text, port_text = authority, None
        else:
            port_text = port_text_or_empty
        host = _canonical_host(text, host_text)
    if port_text is not None and (not _PORT.fullmatch(port_text) or int(port_text) > 65535):
        raise InvalidOriginError(f"{text!r} has an invalid port; use 1-65535 without leading zeros")
    return host, port_text


def _canonical_host(text: str, host: str) -> str:
    """The host as a browser serialises it: ASCII, lower case, internationalised labels as
    A-labels under IDNA 2008 with the UTS #46 mapping (the ``idna`` package).

    Not Python's ``"idna"`` codec: that is IDNA 2003, which maps ``ß`` to ``ss`` and ``ς`` to ``σ``,
    so ``https://faß.de`` would trust ``https://fass.de`` — another registrable name — and refuse
    ``https://xn--fa-hia.de``, the origin browsers send. Joiners outside their permitted contexts
    (RFC 5892 CONTEXTJ) and invalid A-labels are refused.
    """
    if not host:
        raise InvalidOriginError(f"{text!r} has no host")
    if not host.isascii() or any(label.lower().startswith("xn--") for label in host.split(".")):
        try:
            host = idna.encode(host, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError) as exc:
            raise InvalidOriginError(f"{text!r} has a host name that is not valid IDNA 2008: {exc}") from None
    host = host.lower()
    if len(host) > 253 or host.endswith("."):
        raise InvalidOriginError(f"{text!r} has an invalid host name")
    if not all(_HOST_LABEL.fullmatch(label) for label in host.split(".")):
        raise InvalidOriginError(f"{text!r} has an invalid host name")
    return host


def parse_origins(values: list[str] | tuple[str, ...], *, patterns: bool = False) -> tuple[str, ...]:
    """Canonical origins in their given order, duplicates removed.

    With ``patterns``, a value starting ``scheme://*.`` is parsed by :func:`parse_origin_pattern`;
    without, every wildcard is refused (``'…' is a wildcard; list every origin explicitly``).
    """
    if not patterns:
        return tuple(dict.fromkeys(parse_origin(value) for value in values))
    return tuple(
        dict.fromkeys(
            parse_origin_pattern(value) if "*" in value and value.strip() != "*" else parse_origin(value)
            for value in values
        )
    )


class OriginMatcher:
    """Which request origins a configured list trusts: CORS and CSRF decide through the same one.

    Built from canonical origins (:func:`parse_origins`' output, patterns included). An exact
    origin is a set member (O(1)); patterns are tried only when that look-up misses, and only
    in O(1) too: the request origin's first label is replaced by ``*`` and the result looked up
    among the patterns, then the label is checked to be one LDH label; origins that matched are
    remembered (up to :data:`MATCHED_CACHE_SIZE`), so a returning one costs a set look-up. Keys are
    the comparable forms :func:`request_origin_key` and :func:`origin_of_url` give (ASCII, lower case).
    """

    __slots__ = ("_matched", "_matched_bytes", "_pattern_bytes", "exact", "patterns")

    def __init__(self, origins: Iterable[str]) -> None:
        origins = tuple(origins)
        self.exact: frozenset[str] = frozenset(origin for origin in origins if not is_origin_pattern(origin))
        self.patterns: frozenset[str] = frozenset(origin for origin in origins if is_origin_pattern(origin))
        self._pattern_bytes = frozenset(pattern.encode("ascii") for pattern in self.patterns)
        self._matched: set[str] = set()
        self._matched_bytes: set[bytes] = set()

    def __contains__(self, key: object) -> bool:
        if key in self.exact:
            return True
        return bool(self.patterns) and isinstance(key, str) and self.matches_pattern(key)

    def __bool__(self) -> bool:
        return bool(self.exact or self.patterns)

    def __repr__(self) -> str:
        return f"OriginMatcher({sorted(self.exact | self.patterns)!r})"

    def matches_pattern(self, key: str) -> bool:
        """Whether ``key`` (lower case) is one LDH label under one of the patterns."""
        if key in self._matched:
            return True
        start = key.find("://") + 3
        if start < 3:
            return False
        dot = key.find(".", start)
        if dot < 0 or key[:start] + "*" + key[dot:] not in self.patterns:
            return False
        if _LDH_LABEL.fullmatch(key, start, dot) is None:
            return False
        if len(self._matched) < MATCHED_CACHE_SIZE:
            self._matched.add(key)
        return True

    def matches_pattern_bytes(self, key: bytes) -> bool:
        """:meth:`matches_pattern` for a raw, lower-cased ``Origin`` header value (CORS)."""
        if key in self._matched_bytes:
            return True
        start = key.find(b"://") + 3
        if start < 3:
            return False
        dot = key.find(b".", start)
        if dot < 0 or key[:start] + b"*" + key[dot:] not in self._pattern_bytes:
            return False
        if _LDH_LABEL_BYTES.fullmatch(key, start, dot) is None:
            return False
        if len(self._matched_bytes) < MATCHED_CACHE_SIZE:
            self._matched_bytes.add(key)
        return True


def request_origin_key(value: str) -> str | None:
    """The comparable form of a request's ``Origin`` value: ASCII only, lower-cased.

    Non-ASCII input can never equal a canonical origin, so it yields ``None`` rather than
    being case-folded (Unicode case rules could otherwise map it onto ASCII).
    """
    if not value.isascii():
        return None
    return value.lower()


def origin_of_url(url: str) -> str | None:
    """The comparable ``scheme://authority`` prefix of an absolute http(s) URL, else ``None``.

    Used for the ``Referer`` fallback: the prefix is compared exactly against trusted
    origins, so userinfo or any other oddity in the authority makes it not match.
    """
    if not url.isascii():
        return None
    lowered = url.lower()
    if lowered.startswith("https://"):
        start = 8
    elif lowered.startswith("http://"):
        start = 7
    else:
        return None
    end = len(lowered)
    for delimiter in "/?#":
        position = lowered.find(delimiter, start)
        if 0 <= position < end:
            end = position
    if end == start:
        return None
    return lowered[:end]
