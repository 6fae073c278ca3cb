"""``thallus check`` (docs/check.md) against the reference service, a real ``thallus serve`` in the
production profile (grade A or better, no FAIL, and its session survives the CSRF probes), and
against apps that each break one rule (tests/check_apps.py: the check named for the weakness fails,
exit 1); the exits of a target that cannot be scanned (2: closed port, a listener that is not HTTP,
one that never answers, a redirect, which is never followed); the JSON document; the request bound;
the missing ``check`` extra; and the parsers the checks rest on.

Every server binds a loopback address; every loop is bounded.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.check_apps import ALLOWED, CSRF_ENDPOINT, App, Flaws, Hostile, Redirect, raw_listener
from tests.server import THALLUS, running_server, served
from thallus.check import cookies, cors, csp, grading, headers, scan
from thallus.check.cli import CHECK_EXTRA
from thallus.check.model import REASON_LIMIT, Answer, Probe, Result, Status, Target
from thallus.cli import main

PASSWORD = "Correct-Horse-Battery-9!"
PUBLIC = "https://api.example.com"
REFRESH_COOKIE = "__Secure-thallus_refresh"
STATUSES = {"PASS", "WARN", "FAIL"}


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def document(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.stdout)
        return parsed

    def row(self, layer: str, check: str) -> dict[str, str]:
        rows = [row for row in self.document["results"] if (row["layer"], row["check"]) == (layer, check)]
        assert len(rows) == 1, f"no single {layer}/{check} row in {self.stdout}"
        row: dict[str, str] = rows[0]
        return row

    def failures(self) -> list[dict[str, str]]:
        return [row for row in self.document["results"] if row["status"] == "FAIL"]


def check(*args: str) -> Run:
    """``thallus check`` in this process (the apps run in threads of it), stdout and stderr captured."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["check", *args])
    return Run(code, out.getvalue(), err.getvalue())


def check_process(*args: str, env: dict[str, str] | None = None) -> Run:
    """The installed ``thallus check`` as a process, stdout and stderr pipes."""
    done = subprocess.run(
        [THALLUS, "check", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    return Run(done.returncode, done.stdout, done.stderr)


# -- the reference service ------------------------------------------------------------------------


def production(data_dir: Path) -> dict[str, str]:
    return {
        "THALLUS_ENV": "production",
        "THALLUS_SECRET_KEY": "thallus-check-served-secret-" + "s" * 20,
        "THALLUS_ALLOWED_ORIGINS": ALLOWED,
        "THALLUS_PUBLIC_ORIGIN": PUBLIC,
        "THALLUS_DATA_DIR": str(data_dir),
        "THALLUS_ARGON2_TIME_COST": "1",
        "THALLUS_ARGON2_MEMORY_COST": "19456",
        "THALLUS_ARGON2_PARALLELISM": "1",
        "THALLUS_LOG_LEVEL": "WARNING",
    }


def sign_in(url: str, settings: dict[str, str]) -> str:
    """A user made with ``thallus users create``, signed in: the refresh cookie's value."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("THALLUS_") or k.startswith("THALLUS_TEST_")}
    created = subprocess.run(
        [THALLUS, "users", "create", "--email", "ada@example.com", "--password", "-"],
        env={**env, **settings},
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert created.returncode == 0, created.stderr
    login = httpx.post(
        url + "/api/v1/auth/login",
        json={"email": "ada@example.com", "password": PASSWORD},
        headers={"Origin": PUBLIC, "Sec-Fetch-Site": "same-origin"},
        timeout=30,
    )
    assert login.status_code == 200, login.text
    return login.cookies[REFRESH_COOKIE]


def test_reference_service_in_production_grades_a_with_no_fail(tmp_path: Path) -> None:
    """The CSRF probes use the refresh cookie on ``POST /api/v1/auth/logout``: had one been accepted,
    it would only have ended this session — and the session still refreshes afterwards."""
    settings = production(tmp_path)
    with running_server(settings) as server:
        refresh = sign_in(server.url, settings)
        scanned = check_process(
            server.url + "/health",
            "--allowed-origin",
            ALLOWED,
            "--cookie",
            f"{REFRESH_COOKIE}={refresh}",
            "--csrf-endpoint",
            "/api/v1/auth/logout",
            "--env",
            "production",
            "--json",
        )
        assert scanned.code == 0, scanned.stdout + scanned.stderr
        assert scanned.stderr == ""
        assert scanned.document["grade"] in ("A+", "A"), scanned.stdout
        assert scanned.failures() == []
        for evidence in ("foreign-origin", "null-origin", "cross-site-fetch", "foreign-referer", "no-origin-evidence"):
            assert scanned.row("csrf", evidence)["status"] == "PASS"
            assert "CSRFError" in scanned.row("csrf", evidence)["reason"]
        assert scanned.row("headers", "strict-transport-security")["status"] == "PASS"
        again = httpx.post(
            server.url + "/api/v1/auth/refresh",
            cookies={REFRESH_COOKIE: refresh},
            headers={"Origin": PUBLIC, "Sec-Fetch-Site": "same-origin"},
            timeout=30,
        )
        assert again.status_code == 200, "a CSRF probe got through and ended the session"

        table = check_process(server.url + "/health", "--allowed-origin", ALLOWED)
    assert table.code == 0, table.stdout + table.stderr
    assert table.stderr == "", "nothing but the report, and no progress bar, in a pipe"
    assert "\x1b[" not in table.stdout
    for layer in ("transport", "headers", "cors", "correlation", "errors", "cookies"):
        assert f"\n {layer} " in table.stdout
    assert "Grade A" in table.stdout
    assert "CSRF not probed" in table.stdout


# -- apps with one weakness each --------------------------------------------------------------------


def scan_app(app: App, *extra: str) -> Run:
    with served(app) as url:
        cookie = ("--cookie", "__Host-session=abc123", "--csrf-endpoint", CSRF_ENDPOINT)
        return check(url + "/health", "--allowed-origin", ALLOWED, *cookie, *extra, "--json")


def test_the_sound_app_has_no_fail() -> None:
    """The apps below differ from this one by one flaw each, so each FAIL is that flaw's."""
    scanned = scan_app(App())
    assert scanned.code == 0, scanned.stdout + scanned.stderr
    assert scanned.failures() == []
    assert scanned.document["grade"] in ("A+", "A")


@pytest.mark.parametrize(
    ("flaws", "layer", "checks"),
    [
        (
            Flaws(reflect_origin=True),
            "cors",
            ["foreign-origin", "null-origin", "lookalike-suffix", "lookalike-prefix", "http-downgrade"],
        ),
        (Flaws(wildcard_credentials=True), "cors", ["wildcard-origin"]),
        (
            Flaws(missing_headers=True),
            "headers",
            ["x-content-type-options", "content-security-policy", "framing", "strict-transport-security"],
        ),
        (
            Flaws(accept_cross_site=True),
            "csrf",
            ["foreign-origin", "null-origin", "cross-site-fetch", "foreign-referer", "no-origin-evidence"],
        ),
        (Flaws(echo_correlation=True), "correlation", ["injected-html", "injected-crlf", "oversized"]),
        (Flaws(insecure_cookie=True), "cookies", ["session"]),
        (
            Flaws(html_errors=True),
            "errors",
            ["not-found", "method-not-allowed", "unauthorized", "bad-request", "consistent-fields"],
        ),
    ],
    ids=[
        "origin-reflection",
        "wildcard-credentials",
        "missing-headers",
        "csrf-accepted",
        "correlation-echoed",
        "insecure-cookie",
        "html-errors",
    ],
)
def test_each_weakness_fails_its_check(flaws: Flaws, layer: str, checks: list[str]) -> None:
    scanned = scan_app(App(flaws))
    assert scanned.code == 1, scanned.stdout + scanned.stderr
    for name in checks:
        assert scanned.row(layer, name)["status"] == "FAIL", scanned.row(layer, name)
    assert {row["layer"] for row in scanned.failures()} <= {layer, "correlation"}, scanned.failures()
    assert scanned.document["grade"] not in ("A+", "A")


def test_the_development_profile_sends_no_evidence_less_csrf_probe() -> None:
    """Development lets such a request through (design.md §5 rule 4): it is not sent, nor graded."""
    app = App()
    scanned = scan_app(app, "--env", "development")
    assert scanned.code == 0
    assert scanned.row("csrf", "no-origin-evidence") == {
        "layer": "csrf",
        "check": "no-origin-evidence",
        "status": "PASS",
        "reason": "not probed: development lets requests with no Origin, Referer or Sec-Fetch-Site through",
    }
    assert app.requests == 12 + 5 + 4


def test_a_hostile_answer_gives_bounded_one_line_reasons() -> None:
    with served(Hostile()) as url:
        scanned = check(url + "/", "--json")
    assert scanned.code == 1, scanned.stderr
    reasons = [row["reason"] for row in scanned.document["results"]]
    assert all(0 < len(reason) <= REASON_LIMIT and "\n" not in reason for reason in reasons)
    assert scanned.row("cookies", "set-cookie")["status"] == "WARN"  # 30 names, 20 rows
    assert scanned.row("headers", "framing")["status"] == "FAIL"
    assert scanned.row("errors", "not-found")["status"] == "WARN"  # JSON, but no error type and message


# -- targets that cannot be scanned ----------------------------------------------------------------


def test_a_closed_port_exits_2() -> None:
    with raw_listener(b"") as url:
        pass  # the listener is closed again: nothing listens on its port now
    scanned = check(url + "/", "--timeout", "2")
    assert scanned.code == 2
    assert scanned.stdout == ""
    assert scanned.stderr.startswith("thallus check: cannot connect to http://127.0.0.1:")
    assert scanned.stderr.count("\n") == 1 and "Traceback" not in scanned.stderr


def test_a_listener_that_is_not_http_exits_2() -> None:
    with raw_listener(b"SSH-2.0-OpenSSH_9.6\r\n") as url:
        scanned = check(url + "/", "--timeout", "2")
    assert scanned.code == 2
    assert scanned.stderr.startswith("thallus check: not an HTTP answer from ")
    assert scanned.stderr.count("\n") == 1


def test_a_listener_that_never_answers_times_out_with_exit_2() -> None:
    with raw_listener(None) as url:
        started = time.monotonic()
        scanned = check(url + "/", "--timeout", "0.5")
        elapsed = time.monotonic() - started
    assert scanned.code == 2
    assert scanned.stderr.startswith("thallus check: timed out waiting for an answer: ")
    assert elapsed < 5


def test_tls_errors_exit_2(tmp_path: Path) -> None:
    """A self-signed certificate, and https spoken to a plain-http server: one line each, exit 2."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed: no certificate to serve")
    certificate, key = tmp_path / "certificate.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(certificate),
        ],
        capture_output=True,
        check=True,
        timeout=60,
    )
    with served(App(), tls=(str(certificate), str(key))) as url:
        self_signed = check(url + "/health", "--timeout", "5")
    with served(App()) as url:
        plain = check(url.replace("http://", "https://") + "/health", "--timeout", "5")
    for scanned in (self_signed, plain):
        assert scanned.code == 2
        assert scanned.stderr.startswith("thallus check: TLS error talking to https://127.0.0.1:"), scanned.stderr
        assert scanned.stderr.count("\n") == 1
    assert "CERTIFICATE_VERIFY_FAILED" in self_signed.stderr


def test_a_redirect_to_another_host_is_reported_and_not_followed() -> None:
    elsewhere = App()
    with served(elsewhere, host="127.0.0.2") as other, served(Redirect(other + "/health")) as url:
        scanned = check(url + "/health", "--json")
    assert scanned.code == 2
    assert scanned.stdout == ""
    assert f"redirecting to {other}/health (another host)" in scanned.stderr
    assert "not followed" in scanned.stderr
    assert elsewhere.requests == 0


# -- the document, the bound, the extra ------------------------------------------------------------


def test_json_is_one_document_of_the_documented_shape() -> None:
    with served(App()) as url:
        scanned = check(url + "/health", "--json")
    document = scanned.document
    assert set(document) == {"target", "grade", "results"}
    assert document["target"] == url + "/health"
    assert document["grade"] in {letter for _, letter in grading.BANDS}
    assert document["results"]
    for row in document["results"]:
        assert set(row) == {"layer", "check", "status", "reason"}
        assert row["status"] in STATUSES
        assert row["reason"] and "\n" not in row["reason"]
    pairs = [(row["layer"], row["check"]) for row in document["results"]]
    assert len(pairs) == len(set(pairs))


def test_the_request_count_is_bounded_and_stays_on_the_target() -> None:
    """Ten allowed origins, all patterns (six probes each), CSRF and --allow-destructive: the largest plan."""
    app = App()
    origins = [f"https://*.example{n}.org" for n in range(10)]
    with served(app) as url:
        arguments = [a for origin in origins for a in ("--allowed-origin", origin)]
        scanned = check(
            url + "/health",
            *arguments,
            "--cookie",
            "s=1",
            "--csrf-endpoint",
            CSRF_ENDPOINT,
            "--allow-destructive",
            "--json",
        )
    assert scanned.code in (0, 1)
    assert app.requests == scan.MAX_REQUESTS == 80
    assert scan.MAX_REQUESTS < 200
    assert set(app.hosts) == {url.removeprefix("http://")}
    assert scanned.row("cors", "pattern-depth")["status"] == "PASS"


def test_eleven_allowed_origins_are_a_usage_error() -> None:
    arguments = [a for n in range(11) for a in ("--allowed-origin", f"https://app{n}.example.com")]
    scanned = check("http://127.0.0.1:9/", *arguments)
    assert scanned.code == 2
    assert "at most 10" in scanned.stderr


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["ftp://127.0.0.1/"], "is not an http:// or https:// URL"),
        (["http://user:secret@127.0.0.1/"], "no user:password@"),
        (["http://127.0.0.1/", "--cookie", "s=1"], "go together"),
        (["http://127.0.0.1/", "--cookie", "s=1", "--csrf-endpoint", "//evil.example/x"], "is not a path"),
        (["http://127.0.0.1/", "--allowed-origin", "https://app.example.com/"], "is not scheme://host"),
        (["http://127.0.0.1/", "--timeout", "0"], "--timeout"),
    ],
)
def test_usage_errors_exit_2(arguments: list[str], message: str) -> None:
    scanned = check(*arguments)
    assert scanned.code == 2
    assert message in scanned.stderr


def test_help_states_the_request_bound() -> None:
    scanned = check("--help")
    assert scanned.code == 0
    assert f"at most {scan.MAX_REQUESTS} requests" in " ".join(scanned.stdout.split())


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)


def test_without_the_check_extra_it_says_what_to_install() -> None:
    blocked = "import sys; sys.modules['httpx'] = None; from thallus.cli import main; sys.exit(main(['check', 'http://127.0.0.1/']))"
    done = _python(blocked)
    assert done.returncode == 2
    assert CHECK_EXTRA in done.stderr
    assert "httpx" in done.stderr


def test_importing_the_scanner_loads_neither_httpx_nor_rich() -> None:
    done = _python(
        "import sys, thallus.check.cli, thallus.check.scan, thallus.check.probes, thallus.check.report\n"
        "print(sorted({name.split('.')[0] for name in sys.modules} & {'httpx', 'rich', 'h11', 'httpcore'}))"
    )
    assert done.stdout.strip() == "[]", done.stderr


def test_it_needs_nothing_of_the_server_extra() -> None:
    with served(App()) as url:
        code = (
            "import sys\n"
            "for name in ('fastapi', 'sqlalchemy', 'uvicorn', 'starlette', 'alembic', 'jwt', 'argon2'):\n"
            "    sys.modules[name] = None\n"
            "from thallus.cli import main\n"
            f"sys.exit(main(['check', {url + '/health'!r}, '--json']))\n"
        )
        done = _python(code)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["grade"]


def test_a_progress_bar_on_a_terminal_only() -> None:
    import fcntl
    import struct
    import termios
    import threading

    app = App(delay=0.05)
    with served(app) as url:
        controller, device = os.openpty()
        fcntl.ioctl(device, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
        chunks: list[bytes] = []

        def read() -> None:
            for _ in range(100_000):
                try:
                    chunk = os.read(controller, 65536)
                except OSError:
                    return
                if not chunk:
                    return
                chunks.append(chunk)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "COLUMNS")}
        try:
            process = subprocess.Popen(
                [THALLUS, "check", url + "/health", "--json"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=device,
                env={**env, "TERM": "xterm-256color"},
            )
            os.close(device)
            stdout, _ = process.communicate(timeout=60)
            reader.join(10)
        finally:
            os.close(controller)
    assert process.returncode == 0
    assert json.loads(stdout)["results"]
    assert "probing" in b"".join(chunks).decode(errors="replace")


# -- the parsers and judges, on hand-made answers ------------------------------------------------


def answer(*headers: tuple[str, str], status: int = 200, body: bytes = b"") -> Answer:
    return Answer(Probe("success", "GET", "/"), status, tuple((name.lower(), value) for name, value in headers), body)


TARGET = Target("https", "api.example.com", None, "/")


@pytest.mark.parametrize(
    ("policy", "status", "text"),
    [
        ("default-src 'self'; object-src 'none'; frame-ancestors 'none'", Status.PASS, ""),
        ("default-src 'none'; frame-ancestors 'none'", Status.PASS, ""),
        (
            "default-src 'self'; script-src 'self' 'unsafe-inline'; object-src 'none'; frame-ancestors 'none'",
            Status.FAIL,
            "'unsafe-inline'",
        ),
        ("script-src 'nonce-abc' 'unsafe-inline'; object-src 'none'; frame-ancestors 'none'", Status.PASS, ""),
        ("default-src *; frame-ancestors 'none'", Status.FAIL, "* in script-src"),
        ("default-src 'self' 'unsafe-eval'; object-src 'none'; frame-ancestors 'none'", Status.WARN, "'unsafe-eval'"),
        ("default-src 'self'; object-src 'none'", Status.WARN, "no frame-ancestors"),
        ("default-src 'self'; frame-ancestors 'none'", Status.WARN, "no object-src"),
        ("frame-ancestors 'none'", Status.FAIL, "no script-src or default-src"),
        ("default-src https:; object-src 'none'; frame-ancestors 'none'", Status.FAIL, "https: in script-src"),
    ],
)
def test_csp_weaknesses(policy: str, status: Status, text: str) -> None:
    found = csp.problems(csp.parse([policy]), https=True)
    assert (found[0][0] if found else Status.PASS) is status
    assert text in "; ".join(reason for _, reason in found)


def test_csp_weakness_counts_only_when_every_policy_has_it() -> None:
    assert (
        csp.problems(
            csp.parse(["default-src *", "default-src 'self'; object-src 'none'; frame-ancestors 'none'"]), https=True
        )
        == []
    )


@pytest.mark.parametrize(
    ("value", "env", "status"),
    [
        (None, "production", Status.FAIL),
        (None, "test", Status.PASS),
        ("max-age=31536000", "production", Status.PASS),
        ("max-age=15768000; includeSubDomains", "production", Status.PASS),
        ("max-age=86400", "production", Status.WARN),
        ("max-age=0", "production", Status.FAIL),
        ("includeSubDomains", "production", Status.FAIL),
        ("max-age=31536000; max-age=1", "production", Status.FAIL),
        ("max-age=31536000; preload", "production", Status.WARN),
    ],
)
def test_hsts(value: str | None, env: str, status: Status) -> None:
    target = Target("https", "api.example.com", None, "/", env=env)  # type: ignore[arg-type]
    sent = [("Strict-Transport-Security", value)] if value else []
    assert headers.strict_transport_security(answer(*sent), target)[0] is status


@pytest.mark.parametrize(
    ("sent", "status"),
    [
        ([("X-Frame-Options", "DENY")], Status.PASS),
        ([("Content-Security-Policy", "frame-ancestors 'self'")], Status.PASS),
        ([("X-Frame-Options", "ALLOW-FROM https://x.example")], Status.FAIL),
        ([("X-Frame-Options", "DENY"), ("Content-Security-Policy", "frame-ancestors *")], Status.FAIL),
        ([], Status.FAIL),
    ],
)
def test_framing(sent: list[tuple[str, str]], status: Status) -> None:
    assert headers.framing(answer(*sent), TARGET)[0] is status


@pytest.mark.parametrize(
    ("value", "status"),
    [
        ("strict-origin-when-cross-origin", Status.PASS),
        ("unsafe-url", Status.WARN),
        ("unsafe-url, no-referrer", Status.PASS),
        ("no-referrer, bogus", Status.PASS),
        ("bogus", Status.WARN),
    ],
)
def test_referrer_policy_last_known_token_wins(value: str, status: Status) -> None:
    assert headers.referrer_policy(answer(("Referrer-Policy", value)), TARGET)[0] is status


@pytest.mark.parametrize(
    ("header", "status", "text"),
    [
        ("__Host-s=1; Path=/; Secure; HttpOnly; SameSite=Strict", Status.PASS, ""),
        ("__Secure-thallus_refresh=1; Path=/api/v1/auth; Secure; HttpOnly; SameSite=Strict", Status.PASS, ""),
        ("session=1; Path=/", Status.FAIL, "not Secure"),
        ("__Secure-s=1; Path=/; HttpOnly; SameSite=Lax", Status.FAIL, "__Secure- without Secure"),
        ("__Host-s=1; Path=/app; Secure; HttpOnly; SameSite=Lax", Status.FAIL, "__Host- without"),
        ("prefs=dark; Path=/; Secure; SameSite=Lax", Status.PASS, ""),
        ("__Host-session=1; Path=/; Secure; SameSite=Lax", Status.FAIL, "no HttpOnly"),
        ("__Host-sid=1; Path=/; Secure; HttpOnly; SameSite=None", Status.WARN, "SameSite=None"),
        ("__Host-sid=1; Path=/; Secure; HttpOnly; SameSite=Loose", Status.FAIL, "SameSite='Loose'"),
        ("__Host-sid=1; Path=/; Secure; HttpOnly", Status.WARN, "no SameSite"),
        ("sessionid=1; Path=/; Secure; HttpOnly; SameSite=Lax", Status.WARN, "prefix"),
    ],
)
def test_cookie_attributes(header: str, status: Status, text: str) -> None:
    found, problems = cookies.judge(cookies.parse(header), TARGET)
    assert found is status, problems
    assert text in "; ".join(problems)


def test_cookies_are_not_required_secure_in_development_over_http() -> None:
    development = Target("http", "127.0.0.1", 8000, "/", env="development")
    assert (
        cookies.judge(cookies.parse("thallus_refresh=1; Path=/api/v1/auth; HttpOnly; SameSite=Lax"), development)[0]
        is Status.PASS
    )


def test_lookalikes_of_exact_origins_and_patterns() -> None:
    assert cors.lookalikes("https://app.example.com") == {
        "lookalike-suffix": "https://app.example.com.evil.example",
        "lookalike-prefix": "https://evilapp.example.com",
        "http-downgrade": "http://app.example.com",
    }
    assert (
        cors.lookalikes("https://*.example.com:8443")["pattern-depth"]
        == "https://deeper.thallus-check.example.com:8443"
    )
    assert cors.matches("https://*.example.com", "https://app.example.com")
    assert not cors.matches("https://*.example.com", "https://a.b.example.com")
    assert not cors.matches("https://*.example.com", "https://example.com")
    assert not cors.matches("https://*.example.com", "https://evilexample.com")


def test_a_lookalike_the_allowlist_itself_allows_is_not_probed() -> None:
    target = Target(
        "https", "api.example.com", None, "/", allowed_origins=("https://app.example.com", "https://*.example.com")
    )
    sent = {probe.headers[0][1] for probe in cors.probes(target) if probe.method == "OPTIONS"}
    assert "https://evilapp.example.com" not in sent  # *.example.com allows it
    assert "https://evilexample.com" in sent


def test_the_plan_size_matches_the_documented_figures() -> None:
    bare = Target("http", "127.0.0.1", 8000, "/health")
    assert len(scan.plan(bare)) == scan.FIXED_REQUESTS == 12
    one = Target(
        "http", "127.0.0.1", 8000, "/health", allowed_origins=(ALLOWED,), cookies=(("s", "1"),), csrf_endpoint="/x"
    )
    assert len(scan.plan(one)) == 12 + 5 + 5


def test_grading_rubric() -> None:
    def rows(*statuses: Status, critical: bool = False) -> list[Result]:
        return [Result("x", str(n), status, "r", critical=critical) for n, status in enumerate(statuses)]

    assert grading.score(rows(Status.PASS)) == 100
    assert grading.grade(100) == "A+"
    assert grading.grade(grading.score(rows(Status.WARN, Status.WARN))) == "A"
    assert grading.grade(grading.score(rows(Status.FAIL))) == "B"
    assert grading.grade(grading.score(rows(Status.FAIL, critical=True))) == "D"
    assert grading.score(rows(*[Status.FAIL] * 9)) == 0
    assert grading.grade(0) == "F"


def _cors_answers(
    refused: tuple[tuple[str, str], ...], plain: tuple[tuple[str, str], ...] = (("Vary", "Origin"),)
) -> dict[str, Answer]:
    """The answers of a scan with no allowed origin: the baseline, and the CORS probes answered ``refused``."""
    target = Target("https", "api.example.com", None, "/")
    answers = {probe.key: answer(*plain, status=200) for probe in scan.plan(target)}
    for probe in cors.probes(target):
        origin = dict(probe.headers)["Origin"]
        sent = tuple((name, origin if value == "{origin}" else value) for name, value in refused)
        answers[probe.key] = Answer(
            probe, 403 if probe.method == "OPTIONS" else 200, tuple((n.lower(), v) for n, v in sent)
        )
    return answers


def _cors_rows(answers: dict[str, Answer]) -> dict[str, Result]:
    return {row.check: row for row in cors.analyse(Target("https", "api.example.com", None, "/"), answers)}


def test_cors_credentials_for_a_refused_origin_warn() -> None:
    rows = _cors_rows(_cors_answers((("Access-Control-Allow-Credentials", "true"), ("Vary", "Origin"))))
    assert rows["credentials-refused-origin"].status is Status.WARN
    assert rows["foreign-origin"].status is Status.PASS


def test_cors_reflection_without_vary_fails_twice() -> None:
    rows = _cors_rows(_cors_answers((("Access-Control-Allow-Origin", "{origin}"),)))
    assert rows["foreign-origin"].status is Status.FAIL
    assert not rows["foreign-origin"].critical  # no credentials: as bad as *, not worse
    assert rows["vary-origin"].status is Status.FAIL


def test_cors_a_public_wildcard_warns() -> None:
    rows = _cors_rows(_cors_answers((("Access-Control-Allow-Origin", "*"),)))
    assert rows["wildcard-origin"].status is Status.WARN
    assert "see wildcard-origin" in rows["foreign-origin"].reason


def test_the_api_key_goes_only_where_a_client_would_send_it() -> None:
    target = Target(
        "https", "api.example.com", None, "/me", api_key="thal_k", cookies=(("s", "1"),), csrf_endpoint="/x"
    )
    keyed = {probe.key for probe in scan.plan(target) if ("X-API-Key", "thal_k") in probe.headers}
    assert "success" in keyed and "correlation-valid" in keyed and "cors-foreign-get" in keyed
    assert not any(
        key.startswith(("csrf-", "cors-foreign-preflight", "cors-null")) for key in keyed
    )  # a key exempts CSRF
    assert "unauthorized" not in keyed  # an invalid Bearer alone: two credentials are a 400


def test_a_header_missing_only_on_errors_fails_and_names_the_answer() -> None:
    target = Target("https", "api.example.com", None, "/")
    plan = {probe.key: probe for probe in scan.plan(target)}
    answers = {key: Answer(probe, 200, (("x-content-type-options", "nosniff"),)) for key, probe in plan.items()}
    answers["not-found"] = Answer(plan["not-found"], 404, ())
    rows = {row.check: row for row in headers.analyse(target, answers)}
    assert rows["x-content-type-options"].status is Status.FAIL
    assert rows["x-content-type-options"].reason.endswith("on GET /thallus-check-0123456789 (404)")
