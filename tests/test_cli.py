"""The ``thallus`` command, run as a real process: ``config show`` and ``serve``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server import THALLUS, Server, running_server

SECRET = "p" * 40
PRODUCTION = {
    "THALLUS_ENV": "production",
    "THALLUS_ALLOWED_ORIGINS": "https://app.example.com",
    "THALLUS_PUBLIC_ORIGIN": "https://api.example.com",
    "THALLUS_SECRET_KEY": SECRET,
}


def thallus(*args: str, **environment: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("THALLUS_")}
    env.update(environment)
    return subprocess.run([THALLUS, *args], env=env, capture_output=True, text=True, timeout=60, check=False)


# -- config show ------------------------------------------------------------------------------


def test_config_show_production() -> None:
    result = thallus("config", "show", **PRODUCTION)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for expected in [
        "Environment: production",
        "Public origin: https://api.example.com",
        "X-Content-Type-Options: nosniff",
        "X-Frame-Options: DENY",
        "X-XSS-Protection: 1; mode=block",
        "Referrer-Policy: strict-origin-when-cross-origin",
        "Strict-Transport-Security: max-age=31536000",
        "Permissions-Policy: camera=(), microphone=()",
        "Content-Security-Policy: default-src 'self'; object-src 'none'",
        "Allowed origins: https://app.example.com",
        "Allow credentials: true",
        "Allowed methods: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS",
        "Allowed headers: Authorization, Content-Type, X-API-Key, X-Correlation-ID",
        "Session cookie: __Secure-thallus_refresh",
        "Secure; HttpOnly; SameSite=Strict; Path=/api/v1/auth",
        "CSRF: strict",
        "Clients counted per IPv4 /32, IPv6 /64",
        "Request bodies: at most 1048576 bytes; 408 after a 30 s pause or, after that long, below 500 B/s",
        "Connections (thallus serve): headers within 10 s, idle 5 s, at most 1000 per worker and 100 per client",
        "Password hashing: Argon2id, 65536 KiB, t=3, p=4; at most",
        "No Sec-Fetch-Site, Origin or Referer: 403",
    ]:
        assert expected in out, expected
    assert SECRET not in out


def test_config_show_prints_the_options_as_configured() -> None:
    result = thallus(
        "config",
        "show",
        "--json",
        THALLUS_CORS_ALLOW_METHODS="get,post",
        THALLUS_CORRELATION_HEADER="X-Request-ID",
        THALLUS_CSRF_EXEMPT_PATHS="/hooks/billing",
        THALLUS_X_FRAME_OPTIONS="sameorigin",
        THALLUS_CROSS_ORIGIN_EMBEDDER_POLICY="require-corp",
    )
    assert result.returncode == 0, result.stderr
    policy = json.loads(result.stdout)
    assert policy["cors"]["allowed_methods"] == ["GET", "POST"]
    assert "X-Request-ID" in policy["cors"]["allowed_headers"]
    assert policy["cors"]["exposed_headers"][0] == "X-Request-ID"
    assert policy["correlation_header"] == "X-Request-ID"
    assert policy["csrf"]["exempt_paths"] == ["/hooks/billing"]
    assert policy["headers"]["X-Frame-Options"] == "SAMEORIGIN"
    assert "frame-ancestors 'self'" in policy["headers"]["Content-Security-Policy"]
    assert policy["headers"]["Cross-Origin-Embedder-Policy"] == "require-corp"
    assert policy["metrics"] == {"endpoint": "/metrics", "access": "loopback"}


def test_config_show_development_json() -> None:
    result = thallus("config", "show", "--json")
    assert result.returncode == 0, result.stderr
    policy = json.loads(result.stdout)
    assert policy["environment"] == "development"
    assert "Strict-Transport-Security" not in policy["headers"]
    assert policy["cookies"] == {
        "name": "thallus_refresh",
        "secure": False,
        "http_only": True,
        "same_site": "Lax",
        "path": "/api/v1/auth",
    }
    assert policy["csrf"]["mode"] == "lenient"
    assert policy["cors"]["allowed_origins"][0] == "http://localhost:3000"


@pytest.mark.parametrize(
    ("change", "line"),
    [
        ({"THALLUS_ALLOWED_ORIGINS": "*"}, "thallus: THALLUS_ALLOWED_ORIGINS: '*' is a wildcard; list every origin explicitly"),
        ({"THALLUS_ALLOWED_ORIGINS": "http://app.example.com"}, "thallus: THALLUS_ALLOWED_ORIGINS: 'http://app.example.com' is not https; production allows https origins only"),
        ({"THALLUS_ALLOWED_ORIGINS": "https://app.example.com/path"}, "thallus: THALLUS_ALLOWED_ORIGINS: 'https://app.example.com/path' has a path; an origin is scheme://host[:port] with nothing after it"),
        ({"THALLUS_SECRET_KEY": "short"}, "thallus: THALLUS_SECRET_KEY: must be at least 32 characters in production"),
        ({"THALLUS_PUBLIC_ORIGIN": ""}, "thallus: THALLUS_PUBLIC_ORIGIN: is required in production (the service's own https origin)"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("command", [("config", "show"), ("serve", "--port", "1")])
def test_invalid_settings_fail_with_one_line(change: dict[str, str], line: str, command: tuple[str, ...]) -> None:
    result = thallus(*command, **{**PRODUCTION, **change})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [line]
    assert result.stdout == ""


def test_version() -> None:
    assert thallus("--version").stdout.startswith("thallus ")


# -- serve ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def production_server() -> Iterator[Server]:
    with running_server(PRODUCTION) as server:
        yield server


def test_serve_health(production_server: Server) -> None:
    response = httpx.get(production_server.url + "/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert response.headers["strict-transport-security"] == "max-age=31536000"
    assert response.headers["x-frame-options"] == "DENY"
    assert "server" not in response.headers, "uvicorn's Server header is off"
    assert response.headers["x-correlation-id"]


def test_serve_head_has_headers_and_no_body(production_server: Server) -> None:
    with socket.create_connection(("127.0.0.1", production_server.port), timeout=5) as sock:
        sock.sendall(b"HEAD /health HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n")
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"x-content-type-options: nosniff" in head.lower()
    assert b"x-correlation-id:" in head.lower()
    assert body == b""


@pytest.mark.parametrize(
    ("method", "path", "headers", "status", "error"),
    [
        ("GET", "/nope", {}, 404, "NotFoundError"),
        ("POST", "/health", {"Origin": "https://api.example.com", "Cookie": "a=b"}, 405, "MethodNotAllowedError"),
        ("POST", "/health", {"Cookie": "refresh=x", "Origin": "https://evil.example"}, 403, "CSRFError"),
        ("POST", "/health", {"Cookie": "refresh=x"}, 403, "CSRFError"),
        ("OPTIONS", "/health", {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}, 403, "CORSError"),
    ],
)  # fmt: skip
def test_serve_errors(
    production_server: Server, method: str, path: str, headers: dict[str, str], status: int, error: str
) -> None:
    response = httpx.request(method, production_server.url + path, headers=headers)
    assert response.status_code == status
    body = response.json()
    assert body["error"] == error
    assert body["correlation_id"] == response.headers["x-correlation-id"]
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-frame-options"] == "DENY"


def test_serve_preflight_from_the_app(production_server: Server) -> None:
    response = httpx.options(
        production_server.url + "/anything",
        headers={"Origin": "https://app.example.com", "Access-Control-Request-Method": "DELETE"},
    )
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == "https://app.example.com"
    assert response.headers["access-control-allow-credentials"] == "true"


def test_serve_hostile_headers_never_500(production_server: Server) -> None:
    hostile = [
        b"Origin: https://\xff\xfe\xfd\r\nCookie: s=1",
        b"Origin: " + b"a" * 8000 + b"\r\nCookie: s=1",
        b"Referer: \x80\x81//evil\r\nCookie: \xff\x01garbage",
        b"Origin: null\r\nOrigin: https://app.example.com\r\nCookie: s=1",
        b"X-Correlation-ID: \xc3\xa9\xc3\xa9\r\nCookie: ;;;",
    ]
    for extra in hostile:
        with socket.create_connection(("127.0.0.1", production_server.port), timeout=5) as sock:
            sock.sendall(
                b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n" + extra + b"\r\n\r\n"
            )
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
        status_line = raw.split(b"\r\n", 1)[0]
        assert status_line in {b"HTTP/1.1 403 Forbidden", b"HTTP/1.1 405 Method Not Allowed"}, (extra[:40], raw[:200])
        assert b'"correlation_id"' in raw


def test_serve_logs_are_json_with_correlation_ids() -> None:
    with running_server(PRODUCTION) as server:
        httpx.get(server.url + "/health", headers={"X-Correlation-ID": "log-check-1"})
        httpx.post(
            server.url + "/health",
            headers={"Cookie": "a=b", "Origin": "https://evil.example", "X-Correlation-ID": "log-check-2"},
        )
        output = server.output()
    records = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert len(records) == len(output.splitlines()), "every line is JSON"
    access = [r for r in records if r["logger"] == "thallus.access" and r["correlation_id"].startswith("log-check")]
    assert [(r["correlation_id"], r["status"]) for r in access] == [("log-check-1", 200), ("log-check-2", 403)]
    csrf = [r for r in records if r["logger"] == "thallus.csrf"]
    assert csrf[0]["correlation_id"] == "log-check-2"
    assert csrf[0]["csrf"]["origin"] == "https://evil.example"


def test_serve_development_defaults_need_no_configuration() -> None:
    with running_server({}) as server:
        response = httpx.get(server.url + "/health")
        assert response.status_code == 200
        assert "strict-transport-security" not in response.headers
        # development lets non-browser tools through (no origin evidence)
        assert httpx.post(server.url + "/health", headers={"Cookie": "a=b"}).status_code == 405


def test_csp_report_endpoint() -> None:
    with running_server({"THALLUS_CSP_REPORT_URI": "/csp-report"}) as server:
        report = {"csp-report": {"violated-directive": "script-src", "blocked-uri": "inline"}}
        ok = httpx.post(server.url + "/csp-report", json=report, headers={"Content-Type": "application/csp-report"})
        assert ok.status_code == 204
        assert "report-uri /csp-report" in ok.headers["content-security-policy"]
        wrong_type = httpx.post(server.url + "/csp-report", content=b"x", headers={"Content-Type": "text/plain"})
        assert (wrong_type.status_code, wrong_type.json()["error"]) == (415, "UnsupportedMediaTypeError")
        bad_json = httpx.post(server.url + "/csp-report", content=b"{", headers={"Content-Type": "application/json"})
        assert (bad_json.status_code, bad_json.json()["error"]) == (400, "BadRequestError")
        huge = httpx.post(
            server.url + "/csp-report",
            content=b"[" + b"1," * 40000 + b"1]",
            headers={"Content-Type": "application/json"},
        )
        assert (huge.status_code, huge.json()["error"]) == (413, "PayloadTooLargeError")
        output = server.output()
    assert '"csp_report"' in output and "script-src" in output


def test_serve_factory_freezes_its_start_up_objects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Objects built before serving live as long as the process: they are kept out of full garbage
    collections (whose pauses were the served p99, benchmarks/bench_service.py)."""
    import gc
    import logging

    from thallus.server.service import serve_factory

    monkeypatch.setenv("THALLUS_DATA_DIR", str(tmp_path))
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level  # serve_factory configures JSON logging
    gc.unfreeze()
    try:
        serve_factory()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        root.handlers[:] = handlers
        root.setLevel(level)
