"""Origin parsing: what configuration accepts, what it refuses and why; request-side helpers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from thallus.origins import InvalidOriginError, origin_of_url, parse_origin, request_origin_key

VALID = [
    ("https://app.example.com", "https://app.example.com"),
    ("HTTPS://App.Example.COM", "https://app.example.com"),
    ("  https://app.example.com  ", "https://app.example.com"),
    ("http://localhost:3000", "http://localhost:3000"),
    ("http://127.0.0.1:5173", "http://127.0.0.1:5173"),
    ("https://app.example.com:443", "https://app.example.com:443"),  # kept as written; compared exactly
    ("http://[::1]:8080", "http://[::1]:8080"),
    ("http://[0:0:0:0:0:0:0:1]", "http://[::1]"),
    ("https://bücher.example", "https://xn--bcher-kva.example"),
    ("https://my_host.internal", "https://my_host.internal"),
    # IDNA 2008 / UTS #46, as browsers serialise: ß and ς are kept (IDNA 2003 mapped them to ss and σ)
    ("https://faß.de", "https://xn--fa-hia.de"),
    ("https://XN--FA-HIA.de", "https://xn--fa-hia.de"),
    ("https://ς.example", "https://xn--3xa.example"),
    ("https://σ.example", "https://xn--4xa.example"),
    ("https://ＡＰＰ.example.com", "https://app.example.com"),  # full-width: UTS #46 maps it
    ("https://аpple.example", "https://xn--pple-43d.example"),  # Cyrillic а: its own name, never apple
    ("https://ab\u094d\u200cc.example", "https://xn--abc-tmh9220a.example"),  # ZWNJ after a virama: allowed
]

INVALID = [
    ("", "empty"),
    ("*", "wildcard"),
    ("https://*.example.com", "wildcard"),
    ("null", "never trusted"),
    ("NULL", "never trusted"),
    ("app.example.com", "no scheme"),
    ("//app.example.com", "no scheme"),
    ("ftp://app.example.com", "only http and https"),
    ("chrome-extension://abcdef", "only http and https"),
    ("https://app.example.com/", "path"),
    ("https://app.example.com/app", "path"),
    ("https://app.example.com?x=1", "query"),
    ("https://app.example.com#top", "fragment"),
    ("https://user@app.example.com", "userinfo"),
    ("https://user:pw@app.example.com", "userinfo"),
    ("https://app.example.com\\evil.com", "backslash"),
    ("https://app example.com", "whitespace"),
    ("https://", "no host"),
    ("https://:443", "no host"),
    ("https://app.example.com:", "invalid port"),
    ("https://app.example.com:0", "invalid port"),
    ("https://app.example.com:080", "invalid port"),
    ("https://app.example.com:65536", "invalid port"),
    ("https://app.example.com:https", "invalid port"),
    ("https://app.example.com.", "invalid host"),
    ("https://-app.example.com", "invalid host"),
    ("https://app..example.com", "invalid host"),
    ("https://[::1", "unterminated"),
    ("https://[zz::1]", "invalid IPv6"),
    ("https://[::1]x", "after the IPv6"),
    ("https://" + "a" * 300 + ".com", "invalid host"),
    ("https://a\u200db.example", "not valid IDNA 2008"),  # ZWJ outside its context (RFC 5892 CONTEXTJ)
    ("https://a\u200cb.example", "not valid IDNA 2008"),
    ("https://xn--zz.example", "not valid IDNA 2008"),  # not a valid A-label
]


@pytest.mark.parametrize(
    ("configured", "sent", "allowed"),
    [
        ("https://faß.de", "https://xn--fa-hia.de", True),
        ("https://faß.de", "https://fass.de", False),
        ("https://fass.de", "https://xn--fa-hia.de", False),
        ("https://ς.example", "https://xn--4xa.example", False),  # σ is another name
        ("https://аpple.example", "https://apple.example", False),
        ("https://bücher.example", "https://XN--BCHER-KVA.example", True),
        ("https://bücher.example", "https://bücher.example", False),  # browsers never send Unicode
    ],
)
def test_internationalised_origins_compare_in_their_ascii_form(configured: str, sent: str, allowed: bool) -> None:
    from thallus.cors import CORSMiddleware

    cors = CORSMiddleware(lambda scope, receive, send: None, [configured])  # type: ignore[arg-type, return-value]
    assert (cors.allowed_origin(sent.encode("utf-8")) is not None) is allowed


@pytest.mark.parametrize(("value", "canonical"), VALID)
def test_valid_origins_are_canonicalised(value: str, canonical: str) -> None:
    assert parse_origin(value) == canonical


@pytest.mark.parametrize(("value", "reason"), INVALID)
def test_invalid_origins_are_refused_with_a_reason(value: str, reason: str) -> None:
    with pytest.raises(InvalidOriginError, match=reason):
        parse_origin(value)


@given(st.text(max_size=100))
def test_parse_origin_only_ever_raises_invalid_origin(value: str) -> None:
    try:
        canonical = parse_origin(value)
    except InvalidOriginError:
        return
    assert parse_origin(canonical) == canonical, "canonical form is a fixed point"
    assert canonical.startswith(("http://", "https://"))
    assert canonical == canonical.lower()
    assert not any(char in canonical[8:] for char in "/?#@ ")


@given(
    scheme=st.sampled_from(["http", "https"]),
    labels=st.lists(st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True), min_size=1, max_size=4),
    port=st.one_of(st.none(), st.integers(1, 65535)),
)
def test_well_formed_origins_round_trip(scheme: str, labels: list[str], port: int | None) -> None:
    origin = f"{scheme}://{'.'.join(labels)}" + (f":{port}" if port else "")
    assert parse_origin(origin) == origin
    assert request_origin_key(origin.upper()) == origin


def test_request_origin_key_refuses_non_ascii() -> None:
    assert request_origin_key("https://app.example.com") == "https://app.example.com"
    assert request_origin_key("https://\u212a.example") is None  # Kelvin sign lower-cases to ASCII 'k'


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("https://app.example.com/path?q#f", "https://app.example.com"),
        ("HTTPS://APP.example.com", "https://app.example.com"),
        ("http://localhost:3000/x", "http://localhost:3000"),
        ("https://app.example.com?x", "https://app.example.com"),
        ("https://app.example.com#x", "https://app.example.com"),
        ("https://a@b.com/", "https://a@b.com"),
        ("https://", None),
        ("https:///path", None),
        ("ftp://app.example.com/", None),
        ("//app.example.com/", None),
        ("", None),
        ("https://é.com/", None),
    ],
)
def test_origin_of_url(url: str, origin: str | None) -> None:
    assert origin_of_url(url) == origin
