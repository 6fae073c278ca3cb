"""Web origins: strict parsing of configured origins, and origin extraction from requests.

A configured origin must be exactly ``scheme://host[:port]`` (RFC 6454 §6.2 serialisation):
http or https, no userinfo, path, query, fragment, wildcard or ``null``. Anything else is
refused at start-up, never silently ignored (a trailing slash that never matches is the
classic misconfiguration; Go's ``AddTrustedOrigin`` and django-cors-headers refuse it too).

Request values are compared as exact strings after lower-casing ASCII letters, so a
look-alike (``https://app.example.com.evil.com``), userinfo trick (``https://app@evil``) or
non-canonical spelling (``https://app.example.com:443``) simply does not match.
"""

from __future__ import annotations

import ipaddress
import re

import idna

ALLOWED_SCHEMES = ("http", "https")

_SCHEME_SPLIT = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", re.DOTALL)
_HOST_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_PORT = re.compile(r"[1-9][0-9]{0,4}")


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
    host, port = _split_host_port(text, rest)
    return f"{scheme}://{host}" + (f":{port}" if port is not None else "")


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


def parse_origins(values: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Canonical origins in their given order, duplicates removed."""
    return tuple(dict.fromkeys(parse_origin(value) for value in values))


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
