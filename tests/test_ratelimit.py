"""Rate limits and client-IP resolution (docs/design.md §10), in memory and on a real Redis."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.apps import ok_app
from tests.asgi import Response, acall, call, http_scope
from tests.conftest import RedisTarget
from tests.service import RecordingSink
from thallus import Settings, protect
from thallus._asgi import ASGIApp
from thallus.ratelimit import RateLimitMiddleware, _network, client_ip, client_network, create_storage, parse_networks

SPA = "https://app.example.com"


def limited(general: str = "3/minute", auth: str = "2/minute", **options: Any) -> RateLimitMiddleware:
    storage = options.pop("storage", None) or create_storage(None, "t")
    return RateLimitMiddleware(ok_app, storage, general=general, auth=auth, **options)


def call_from(app: ASGIApp, peer: str, path: str = "/items", headers: list[tuple[str, str]] | None = None) -> Response:
    scope = http_scope("GET", path, headers or [])
    scope["client"] = (peer, 40000)
    return asyncio.run(acall(app, scope))


# -- client IP --------------------------------------------------------------------------------

PROXIES = parse_networks(["10.0.0.0/8", "2001:db8::/32"])


@pytest.mark.parametrize(
    ("peer", "headers", "expected"),
    [
        ("203.0.113.7", [], "203.0.113.7"),
        ("203.0.113.7", [("x-forwarded-for", "1.2.3.4")], "203.0.113.7"),  # untrusted peer: spoofing changes nothing
        ("203.0.113.7", [("forwarded", "for=1.2.3.4")], "203.0.113.7"),
        ("10.0.0.2", [], "10.0.0.2"),
        ("10.0.0.2", [("x-forwarded-for", "198.51.100.9")], "198.51.100.9"),
        ("10.0.0.2", [("x-forwarded-for", "1.1.1.1, 198.51.100.9")], "198.51.100.9"),  # right-most untrusted
        ("10.0.0.2", [("x-forwarded-for", "1.1.1.1, 198.51.100.9, 10.0.0.5")], "198.51.100.9"),
        ("10.0.0.2", [("x-forwarded-for", "1.1.1.1"), ("x-forwarded-for", "198.51.100.9")], "198.51.100.9"),
        ("10.0.0.2", [("x-forwarded-for", "10.0.0.9, 10.0.0.5")], "10.0.0.9"),  # all trusted: the left-most
        ("10.0.0.2", [("x-forwarded-for", "198.51.100.9:4711")], "198.51.100.9"),
        ("10.0.0.2", [("x-forwarded-for", "[2001:db9::1]:80")], "2001:db9::1"),
        ("10.0.0.2", [("x-forwarded-for", "2001:db9::1")], "2001:db9::1"),
        ("10.0.0.2", [("forwarded", "for=198.51.100.9")], "10.0.0.2"),  # not the configured header
        ("2001:db8::5", [("x-forwarded-for", "198.51.100.9")], "198.51.100.9"),
        # malformed: ignored, never an error
        ("10.0.0.2", [("x-forwarded-for", "not-an-ip")], "10.0.0.2"),
        ("10.0.0.2", [("x-forwarded-for", "198.51.100.9, garbage")], "10.0.0.2"),
        ("10.0.0.2", [("x-forwarded-for", "")], "10.0.0.2"),
        ("10.0.0.2", [("x-forwarded-for", ",,,")], "10.0.0.2"),
        ("10.0.0.2", [("x-forwarded-for", "\xff\xfe")], "10.0.0.2"),
    ],
)
def test_client_ip(peer: str, headers: list[tuple[str, str]], expected: str) -> None:
    scope = {"client": (peer, 1), "headers": [(k.encode(), v.encode("latin-1")) for k, v in headers]}
    assert client_ip(scope, PROXIES) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([("forwarded", 'for="[2001:db9::1]:4711";proto=https, for=10.0.0.7')], "2001:db9::1"),
        ([("forwarded", "for=198.51.100.9;by=10.0.0.2")], "198.51.100.9"),
        ([("forwarded", "for=198.51.100.9"), ("x-forwarded-for", "203.0.113.1")], "198.51.100.9"),
        ([("x-forwarded-for", "203.0.113.1")], "10.0.0.2"),  # the client's own header: ignored
        ([("forwarded", "proto=https")], "10.0.0.2"),
        ([("forwarded", "for=")], "10.0.0.2"),
        ([("forwarded", "for=unknown")], "10.0.0.2"),
    ],
)
def test_client_ip_from_forwarded(headers: list[tuple[str, str]], expected: str) -> None:
    """THALLUS_PROXY_HEADER=forwarded: RFC 7239 only, X-Forwarded-For ignored even from a trusted proxy."""
    scope = {"client": ("10.0.0.2", 1), "headers": [(k.encode(), v.encode("latin-1")) for k, v in headers]}
    assert client_ip(scope, PROXIES, "forwarded") == expected


def test_client_ip_ignores_forwarded_by_default() -> None:
    scope = {"client": ("10.0.0.2", 1), "headers": [(b"forwarded", b"for=1.2.3.4"), (b"x-forwarded-for", b"5.6.7.8")]}
    assert client_ip(scope, PROXIES) == "5.6.7.8"


@pytest.mark.parametrize(
    ("address", "ipv4_prefix", "ipv6_prefix", "expected"),
    [
        ("198.51.100.7", 32, 64, "198.51.100.7"),
        ("198.51.100.7", 24, 64, "198.51.100.0/24"),
        ("::ffff:198.51.100.7", 32, 64, "198.51.100.7"),  # IPv4-mapped: the IPv4 client
        ("::ffff:198.51.100.7", 24, 64, "198.51.100.0/24"),
        ("2001:db8:1:2::1", 32, 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", 32, 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", 32, 64, "2001:db8:1:3::/64"),
        ("2001:db8:1:2::1", 32, 128, "2001:db8:1:2::1"),
        ("2001:db8:1:2::1", 32, 48, "2001:db8:1::/48"),
        ("::1", 32, 64, "::/64"),
        ("unknown", 32, 64, "unknown"),
        ("/tmp/sock", 32, 64, "/tmp/sock"),
    ],
)
def test_client_network(address: str, ipv4_prefix: int, ipv6_prefix: int, expected: str) -> None:
    assert client_network(address, ipv4_prefix, ipv6_prefix) == expected


NEAR_ADDRESSES = st.text(alphabet="0123456789abcdef.:/%", max_size=45)


@given(st.one_of(st.ip_addresses().map(str), NEAR_ADDRESSES), st.integers(1, 32), st.integers(1, 128))
def test_client_network_without_parsing_agrees_with_parsing(address: str, ipv4_prefix: int, ipv6_prefix: int) -> None:
    """The IPv4 /32 shortcut (text without a colon is its own key) and the cache change no answer."""
    parsed = _network.__wrapped__(address, ipv4_prefix, ipv6_prefix)
    assert client_network(address, ipv4_prefix, ipv6_prefix) == parsed
    assert client_network(address, ipv4_prefix, ipv6_prefix) == parsed, "the same from the cache"


def test_one_ipv6_network_shares_a_limit() -> None:
    app = limited(general="2/minute")
    statuses = [call_from(app, f"2001:db8:1:2::{i}").status for i in range(1, 4)]
    assert statuses == [200, 200, 429], "three addresses of one /64 are one client"
    assert call_from(app, "2001:db8:1:3::1").status == 200, "another /64 is another client"
    per_address = limited(general="2/minute", ipv6_prefix=128)
    assert [call_from(per_address, f"2001:db8:1:2::{i}").status for i in range(1, 4)] == [200] * 3


def test_the_audited_address_stays_whole() -> None:
    sink = RecordingSink()
    app = limited(general="1/minute", audit=sink)
    call_from(app, "2001:db8:1:2::1")
    call_from(app, "2001:db8:1:2::2")
    assert [event.ip_address for event in sink.events if event.action == "rate_limited"] == ["2001:db8:1:2::2"]


def test_limiter_options_are_checked() -> None:
    with pytest.raises(ValueError, match="proxy_header"):
        limited(proxy_header="x-real-ip")
    with pytest.raises(ValueError, match="ipv6_prefix"):
        limited(ipv6_prefix=129)


def test_client_ip_without_trusted_proxies_is_the_peer() -> None:
    scope = {"client": ("10.0.0.2", 1), "headers": [(b"x-forwarded-for", b"1.2.3.4")]}
    assert client_ip(scope, ()) == "10.0.0.2"
    assert client_ip({"client": None, "headers": []}, PROXIES) == "unknown"
    assert client_ip({"client": ("/tmp/sock", 0), "headers": []}, PROXIES) == "/tmp/sock"


@given(st.lists(st.tuples(st.sampled_from([b"x-forwarded-for", b"forwarded"]), st.binary(max_size=60)), max_size=4))
def test_client_ip_never_raises(headers: list[tuple[bytes, bytes]]) -> None:
    address = client_ip({"client": ("10.0.0.2", 1), "headers": headers}, PROXIES)
    assert address


# -- the limiter --------------------------------------------------------------------------------


def test_general_limit_then_429() -> None:
    app = limited()
    ok = [call_from(app, "203.0.113.7") for _ in range(3)]
    assert [r.status for r in ok] == [200, 200, 200]
    assert ok[0].header("ratelimit-policy") == '"general";q=3;w=60'
    remaining = [r.header("ratelimit") for r in ok]
    assert [value.split(";")[1] for value in remaining if value] == ["r=2", "r=1", "r=0"]
    refused = call_from(app, "203.0.113.7")
    assert refused.status == 429
    assert refused.header("retry-after") == "60"
    body = refused.json()
    assert body["error"] == "RateLimitError"
    assert body["details"] == {"policy": "general", "limit": "3 per 1 minute", "retry_after": 60}
    assert refused.header("ratelimit-policy") == '"general";q=3;w=60'
    assert (refused.header("ratelimit") or "").startswith('"general";r=0;t=')
    assert call_from(app, "198.51.100.1").status == 200, "another client has its own budget"


def test_auth_endpoints_have_their_own_stricter_limit() -> None:
    app = limited()
    assert [call_from(app, "203.0.113.7", "/api/v1/auth/login").status for _ in range(3)] == [200, 200, 429]
    assert call_from(app, "203.0.113.7", "/items").status == 200, "the general budget is separate"
    refused = call_from(app, "203.0.113.7", "/api/v1/auth/refresh")
    assert refused.header("ratelimit-policy") == '"auth";q=2;w=60'


def test_health_is_exempt() -> None:
    app = limited(general="1/minute")
    assert [call_from(app, "203.0.113.7", "/health").status for _ in range(5)] == [200] * 5
    assert call_from(app, "203.0.113.7", "/health").header("ratelimit") is None


def test_spoofed_forwarding_header_does_not_buy_a_new_budget() -> None:
    app = limited(general="2/minute", trusted_proxies=["10.0.0.0/8"])
    statuses = [
        call_from(app, "203.0.113.7", headers=[("x-forwarded-for", f"198.51.100.{i}")]).status for i in range(3)
    ]
    assert statuses == [200, 200, 429]


def test_trusted_proxy_forwards_each_client_separately() -> None:
    app = limited(general="1/minute", trusted_proxies=["10.0.0.0/8"])
    first = call_from(app, "10.0.0.2", headers=[("x-forwarded-for", "198.51.100.1")])
    second = call_from(app, "10.0.0.2", headers=[("x-forwarded-for", "198.51.100.2")])
    again = call_from(app, "10.0.0.3", headers=[("x-forwarded-for", "198.51.100.1")])
    assert [first.status, second.status, again.status] == [200, 200, 429]


def test_429_is_audited() -> None:
    sink = RecordingSink()
    app = limited(general="1/minute", audit=sink)
    call_from(app, "203.0.113.7")
    call_from(app, "203.0.113.7")
    assert sink.actions() == ["rate_limited"]
    event = sink.events[0]
    assert (event.outcome, event.ip_address, event.path, event.status_code) == ("denied", "203.0.113.7", "/items", 429)


def test_429_through_the_whole_stack_is_protected_and_cors_readable() -> None:
    settings = Settings(rate_limit="1/minute", allowed_origins=SPA)
    app = protect(ok_app, settings)
    call(app, "GET", "/items", [("origin", SPA)])
    refused = call(app, "GET", "/items", [("origin", SPA), ("x-correlation-id", "limit-1")])
    assert refused.status == 429
    assert refused.json()["correlation_id"] == "limit-1"
    assert refused.header("access-control-allow-origin") == SPA
    assert "Retry-After" in (refused.header("access-control-expose-headers") or "")
    assert refused.header("x-frame-options") == "DENY"
    assert refused.header("cache-control") == "no-store"


def test_rate_limiting_can_be_disabled() -> None:
    app = protect(ok_app, Settings(rate_limit="1/minute", rate_limit_enabled=False))
    assert [call(app, "GET", "/").status for _ in range(3)] == [200, 200, 200]


def test_unreachable_redis_fails_open_with_one_log_line_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="thallus.ratelimit")
    app = limited(general="1/minute", storage=create_storage("redis://127.0.0.1:1/0", "t"))
    statuses = [call_from(app, "203.0.113.7").status for _ in range(4)]
    assert statuses == [200] * 4, "general limits fail open"
    errors = [r for r in caplog.records if r.name == "thallus.ratelimit"]
    assert len(errors) == 1
    assert "not enforced" in errors[0].getMessage()


def test_redis_backend(redis_target: RedisTarget) -> None:
    async def scenario() -> list[int]:  # one event loop, as in a server: Redis connections belong to it
        storage_a = create_storage(redis_target.url, redis_target.prefix)
        storage_b = create_storage(redis_target.url, redis_target.prefix)
        first = limited(general="3/minute", storage=storage_a, key_prefix=redis_target.prefix)
        second = limited(general="3/minute", storage=storage_b, key_prefix=redis_target.prefix)
        statuses = []
        for app in (first, second, first, second):
            scope = http_scope("GET", "/items")
            scope["client"] = ("203.0.113.7", 1)
            statuses.append((await acall(app, scope)).status)
        return statuses

    assert asyncio.run(scenario()) == [200, 200, 200, 429], "two limiters sharing Redis share the budget"


@pytest.mark.parametrize("bad", ["lots", "10 per fortnight", ""])
def test_limit_notation_is_validated(bad: str) -> None:
    from thallus.settings import ConfigurationError

    with pytest.raises(ConfigurationError, match=r"^rate_limit: ") as caught:
        Settings.load(rate_limit=bad)
    assert "THALLUS_" not in str(caught.value), "a keyword argument's problem names the keyword"


def test_trusted_proxies_are_validated() -> None:
    from thallus.settings import ConfigurationError

    with pytest.raises(ConfigurationError, match=r"^trusted_proxies: 'proxy\.local' is not an IP address"):
        Settings.load(trusted_proxies="10.0.0.0/8, proxy.local")
