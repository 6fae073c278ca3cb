"""Schema fuzzing of a real ``thallus serve`` with schemathesis, on SQLite and on PostgreSQL.

Each test starts ``thallus serve`` (production profile, plain http on loopback, https origins
configured), creates an admin user with the API-access feature and an API key with the CLI, signs in
over HTTP, loads the service's own ``/openapi.json`` with ``schemathesis.openapi.from_url`` and, for
every operation, sends

1. a fixed hostile corpus (:func:`tests.fuzz_support.hostile_corpus`): each JSON string field holding
   NUL or a lone surrogate, alone and among plausible values of the other fields; NUL in each string
   query and path parameter; cursors in the service's own encoding holding the 64-bit edges, a bool
   and the other JSON types — whatever Hypothesis happens to draw, these are tried on every run;
2. Hypothesis-generated requests, positive (schema-valid) and negative (schema-violating), through
   :func:`tests.fuzz_support.hostile_cases`, which puts the same characters and cursors into generated
   cases (schemathesis generates NUL itself with ``allow-x00``, never a lone surrogate: its alphabet
   excludes category Cs whatever the codec).

Every request carries a real credential — ``Authorization: Bearer`` in one run, ``X-API-Key`` in the
other — same-origin evidence (``Origin``, ``Sec-Fetch-Site``) so that CSRF refuses none of them, and an
``X-Correlation-ID`` of the test's own, so its log lines are found even when no response came.

Every response must have: no 5xx (schemathesis's ``not_a_server_error``; the exception is looked up in
the server's JSON log by correlation ID) and a complete body; the §3 security headers, each once, and
the §7 ``X-Correlation-ID`` (valid, the one sent); for every error, the §8 JSON body with exactly
``error, message, details, correlation_id``, the type of its status, the header's correlation ID, 422
details of ``{type, loc, msg, input}`` that echo no password; no CSRF/CORS refusal and no 429 (the run
would be testing nothing); a 2xx body that conforms to its documented schema
(``response_schema_conformance``); with an API key, never a 2xx from key management or password change
(§9). At the end the server's whole log must not contain the password, the access or refresh token, the
API key, the corpus's password, or an ``$argon2id$`` hash.

Also, for every response: ``status_code_conformance``, ``content_type_conformance``,
``response_headers_conformance`` and ``negative_data_rejection`` — the OpenAPI document lists every
status a route answers with the §8 body (``thallus.server.api.responses``) and the export's two media types,
so a status or body the document does not promise is a failure.

Reproducible: Hypothesis runs with ``derandomize=True`` (the examples are a function of the test code,
not of a random seed) and no example database, so two runs send the same requests. Bounded:
``THALLUS_TEST_FUZZ_EXAMPLES`` (default 30) examples per operation and generation mode, ``deadline=None``.
A failure lists every distinct failure (each shrunk to its minimal form; one per operation and signature)
with a curl command (``$TOKEN``/``$API_KEY`` stand for the run's credentials), the response body and the
request's log lines.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import APIOperation, Case, GenerationMode, Response
from schemathesis.checks import CheckFunction, not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup, ServerError
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy.engine import URL

from tests.fuzz_support import (
    ADMIN_EMAIL,
    BASELINE_CSP,
    EXACT_HEADERS,
    PASSWORD,
    PLAUSIBLE_PASSWORD,
    SAME_ORIGIN,
    Finding,
    LiveServer,
    Problem,
    create_key,
    create_user,
    curl_command,
    distinct_findings,
    error_problems,
    failure_type,
    findings_in,
    format_report,
    fuzz_environment,
    header_problems,
    hostile_cases,
    hostile_corpus,
    leaked_secrets,
    live_server,
    login,
    server_exception,
    status_table,
    without_secrets,
)

MAX_EXAMPLES = int(os.environ.get("THALLUS_TEST_FUZZ_EXAMPLES", "30"))
#: Every schemathesis check that compares a response with the document.
DOCUMENT_CHECKS: list[CheckFunction] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
#: docs/design.md §9: these need a session; an API key gets a 403.
SESSION_ONLY = frozenset(
    {"POST /api/v1/api-keys", "GET /api/v1/api-keys", "DELETE /api/v1/api-keys/{key_id}", "POST /api/v1/auth/password"}
)
#: Run last: with a Bearer token it ends the run's own session.
LAST = ("POST /api/v1/auth/logout",)

AnyCase = Case[Any]
AnyOperation = APIOperation[Any, Any, Any, Any]

CONFIG = schemathesis.Config.from_dict(
    {
        # NUL in generated strings (the default, spelled out); UTF-8 strings — lone surrogates are added
        # by hostile_cases, schemathesis cannot generate them whatever the codec.
        "generation": {"allow-x00": True, "codec": "utf-8"},
        # the reproductions must carry the real password fields and headers (credentials are replaced by
        # shell variables in curl_command)
        "output": {"sanitization": {"enabled": False}},
    }
)
FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    phases=(Phase.explicit, Phase.generate, Phase.shrink),
    suppress_health_check=list(HealthCheck),
    report_multiple_bugs=True,
    verbosity=Verbosity.quiet,
)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """``(name, database URL)``: a SQLite file, or this run's PostgreSQL database (emptied afterwards)."""
    if request.param == "sqlite":
        yield "sqlite", f"sqlite+aiosqlite:///{tmp_path / 'fuzz.db'}"
        return
    postgres: URL = request.getfixturevalue("empty_postgres")
    yield "postgresql", postgres.render_as_string(hide_password=False)


@dataclass
class Run:
    """One fuzz run: a server, the credential every request carries, what was seen."""

    live: LiveServer
    name: str
    auth: str
    headers: dict[str, str]
    #: credential value → the shell variable that stands for it in a reproduction
    variables: dict[str, str]
    session: requests.Session = field(default_factory=requests.Session)
    statuses: dict[str, Counter[int]] = field(default_factory=dict)
    requests: int = 0

    def problems(self, case: AnyCase, response: Response) -> list[Problem]:
        problems: list[Problem] = []
        try:
            case.validate_response(response, checks=DOCUMENT_CHECKS)
        except FailureGroup as group:
            for failure in group.exceptions:
                problems.append(self._schemathesis_problem(failure, response))
        problems += header_problems(response, production=self.live.production)
        problems += error_problems(response, case.body)
        if self.auth == "api_key" and case.operation.label in SESSION_ONLY and 200 <= response.status_code < 300:
            problems.append(Problem("api key allowed", "an API key was allowed a session-only operation (§9)"))
        return problems

    def _schemathesis_problem(self, failure: Failure, response: Response) -> Problem:
        if isinstance(failure, ServerError):
            correlation_id = str(response.request.headers.get("x-correlation-id", ""))
            kind, frame = server_exception(self.live.exception_of(correlation_id))
            return Problem(
                f"not_a_server_error: {failure.status_code} {kind} {frame}".strip(),
                f"not_a_server_error: {failure.status_code}; the server logged {kind} at {frame or '?'}",
            )
        message = " ".join(failure.message.split())
        return Problem(f"{type(failure).__name__}: {failure.title}", f"{failure.title}: {message[:500]}")

    def exchange(self, case: AnyCase, label: str) -> Finding | None:
        """Send one case with the run's credential; the finding when a check fails."""
        self.session.cookies.clear()  # no state from one request to the next
        self.requests += 1
        # our own correlation ID: the request's log lines can be found even when no response came
        correlation_id = f"fuzz.{self.name}.{self.auth}.{self.requests}"
        headers = {**self.headers, "X-Correlation-ID": correlation_id}
        operation = case.operation.label
        try:
            response = case.call(base_url=self.live.url, session=self.session, headers=headers, timeout=30)
        except requests.RequestException as exc:
            kind, frame = server_exception(self.live.exception_of(correlation_id))
            problem = Problem(
                f"no response: {type(exc).__name__}; server: {kind} {frame}".strip(),
                f"no complete response ({type(exc).__name__}: {exc}); the server logged {kind} at {frame or '?'}",
            )
            request = without_secrets(case.as_curl_command(headers=headers, base_url=self.live.url), self.variables)
            return Finding(operation, label, (problem.key,), None, [problem], request, "", correlation_id)
        self.statuses.setdefault(operation, Counter())[response.status_code] += 1
        problems = self.problems(case, response)
        echoed = response.headers.get("x-correlation-id")
        if echoed != [correlation_id]:
            problems.append(
                Problem("correlation ID not echoed", f"sent X-Correlation-ID {correlation_id!r}, got {echoed!r}")
            )
        if not problems:
            return None
        return Finding(
            operation=operation,
            run=label,
            signature=tuple(sorted({problem.key for problem in problems})),
            status=response.status_code,
            problems=problems,
            request=curl_command(case, response, self.live.url, self.variables),
            response_body=response.content.decode("utf-8", "replace"),
            correlation_id=correlation_id,
        )

    def corpus(self, operation: AnyOperation, document: dict[str, Any]) -> list[Finding]:
        """The fixed hostile requests of :func:`hostile_corpus` (each already minimal)."""
        label = f"{self.name}, {self.auth}, corpus"
        findings = []
        for arguments in hostile_corpus(document, operation.path, operation.method):
            finding = self.exchange(operation.Case(**arguments), label)
            if finding is not None:
                findings.append(finding)
        return findings

    def fuzz(self, operation: AnyOperation, mode: GenerationMode) -> list[Finding]:
        """Hypothesis over one operation and mode; the distinct failures, each shrunk."""
        label = f"{self.name}, {self.auth}, {mode.value}"

        @FUZZ_SETTINGS
        @given(case=hostile_cases(operation.as_strategy(generation_mode=mode)))
        def send(case: AnyCase) -> None:
            finding = self.exchange(case, label)
            if finding is not None:
                raise failure_type(finding.signature)(finding)

        try:
            send()
        except Unsatisfiable:
            return []  # nothing of this mode can be generated for the operation
        except Exception as exc:
            found = findings_in(exc)
            if not found:
                raise
            return found
        return []


def modes_for(operation: AnyOperation) -> list[GenerationMode]:
    """Positive data always; negative data where a body or a query can violate the schema (a parameterless
    operation or a plain string path parameter has nothing to negate)."""
    negatable = bool(list(operation.body)) or bool(list(operation.query))
    return [GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if negatable else [GenerationMode.POSITIVE]


@pytest.mark.parametrize("auth", ["bearer", "api_key"])
def test_schema_fuzz(backend: tuple[str, str], auth: str, tmp_path: Path) -> None:
    name, database_url = backend
    started = time.monotonic()
    env = fuzz_environment(tmp_path / "data", database_url)
    create_user(env, ADMIN_EMAIL, PASSWORD, "--admin", "--api-access")
    api_key = create_key(env, ADMIN_EMAIL, "schema fuzz")
    with live_server(env) as live:
        signed_in = login(live.url, ADMIN_EMAIL, PASSWORD)
        credential = (
            {"Authorization": f"Bearer {signed_in.access_token}"} if auth == "bearer" else {"X-API-Key": api_key}
        )
        me = httpx.get(live.url + "/api/v1/users/me", headers={**SAME_ORIGIN, **credential}, timeout=30)
        assert me.status_code == 200, f"the run's credential does not work: {me.status_code} {me.text}"
        assert me.json()["email"] == ADMIN_EMAIL
        run = Run(
            live,
            name,
            auth,
            {**SAME_ORIGIN, **credential},
            {signed_in.access_token: "TOKEN", api_key: "API_KEY"},
        )
        document = httpx.get(live.url + "/openapi.json", headers=SAME_ORIGIN, timeout=30).json()
        schema = schemathesis.openapi.from_url(live.url + "/openapi.json", config=CONFIG, headers=SAME_ORIGIN)
        operations = sorted(
            (result.ok() for result in schema.get_all_operations() if isinstance(result, Ok)),
            key=lambda operation: operation.label in LAST,
        )
        assert len(operations) >= 13, [operation.label for operation in operations]
        findings: list[Finding] = []
        for operation in operations:
            findings += run.corpus(operation, document)
            for mode in modes_for(operation):
                findings += run.fuzz(operation, mode)
        output = live.finish()
    findings = distinct_findings(findings)
    for finding in findings:
        if finding.correlation_id:
            finding.log = live.entries(finding.correlation_id)
    secrets = {
        "test's password": PASSWORD,
        "access token": signed_in.access_token,
        "refresh token": signed_in.refresh_token,
        "API key": api_key,
        "corpus's password": PLAUSIBLE_PASSWORD,  # sent to register/login/password by every run
    }
    leaks = leaked_secrets(output, secrets)
    elapsed = time.monotonic() - started
    print(f"{name}/{auth}: {run.requests} requests in {elapsed:.1f} s\n{status_table(run.statuses)}")
    if findings or leaks:
        pytest.fail(
            f"schema fuzzing of thallus serve ({name}, {auth}) found problems "
            f"({run.requests} requests, {elapsed:.0f} s):\n\n" + format_report(findings, leaks, run.statuses),
            pytrace=False,
        )


# -- the harness's own checks, without a server: each catches what it must -------------------------


def _response(status: int, headers: dict[str, list[str]], body: bytes, path: str = "/api/v1/users/me") -> Response:
    request = requests.Request("GET", "http://127.0.0.1:1" + path).prepare()
    return Response(status, headers, body, request, elapsed=0.0, verify=True)


GOOD_HEADERS = {
    **{name: [value] for name, value in EXACT_HEADERS.items()},
    "permissions-policy": ["camera=(), microphone=(), geolocation=()"],
    "strict-transport-security": ["max-age=31536000"],
    "x-correlation-id": ["fuzz.1"],
    "cache-control": ["no-store"],
    "content-type": ["application/json"],
}


def test_header_checks() -> None:
    assert header_problems(_response(200, GOOD_HEADERS, b"{}"), production=True) == []
    broken = {**GOOD_HEADERS, "content-security-policy": [BASELINE_CSP, BASELINE_CSP], "x-correlation-id": [" x"]}
    del broken["x-frame-options"], broken["strict-transport-security"], broken["cache-control"]
    keys = {problem.key for problem in header_problems(_response(401, broken, b"{}"), production=True)}
    assert keys == {
        "header content-security-policy",
        "header x-frame-options",
        "header strict-transport-security",
        "header x-correlation-id",
        "header cache-control",
    }
    outside_production = {
        problem.key for problem in header_problems(_response(200, GOOD_HEADERS, b"{}"), production=False)
    }
    assert outside_production == {"header strict-transport-security"}


def _error(status: int, error: str, details: object = None, correlation_id: str = "fuzz.1", **extra: object) -> bytes:
    body = {"error": error, "message": "m", "details": details, "correlation_id": correlation_id, **extra}
    return json.dumps(body).encode()


def test_error_shape_checks() -> None:
    assert error_problems(_response(404, GOOD_HEADERS, _error(404, "NotFoundError")), None) == []
    assert error_problems(_response(200, GOOD_HEADERS, b"[]"), None) == []
    cases = {
        "404 error shape": _response(404, GOOD_HEADERS, _error(404, "NotFoundError", detail="x")),
        "400 error type": _response(400, GOOD_HEADERS, _error(400, "ValidationError")),
        "401 correlation_id": _response(401, GOOD_HEADERS, _error(401, "AuthenticationError", correlation_id="z")),
        "403 CSRFError": _response(403, GOOD_HEADERS, _error(403, "CSRFError")),
        "429": _response(429, GOOD_HEADERS, _error(429, "RateLimitError")),
        "415 not JSON": _response(415, {**GOOD_HEADERS, "content-type": ["text/plain"]}, b"no"),
        "422 details": _response(422, GOOD_HEADERS, _error(422, "ValidationError", [{"loc": ["body"]}])),
    }
    for key, response in cases.items():
        assert key in {problem.key for problem in error_problems(response, None)}, key


def test_a_422_may_not_echo_a_sent_password() -> None:
    sent = {"email": "not-an-address", "password": "Secret-Value-1!"}

    def keys(*details: dict[str, object]) -> set[str]:
        response = _response(422, GOOD_HEADERS, _error(422, "ValidationError", list(details)))
        return {problem.key for problem in error_problems(response, sent)}

    item = {"type": "value_error", "msg": "m"}
    assert keys({**item, "loc": ["body", "password"], "input": "Secret-Value-1!"}) == {"422 echoes a secret"}
    assert keys({**item, "loc": ["body", "name"], "input": sent}) == {"422 echoes a secret"}
    assert keys({**item, "loc": ["body", "password"], "input": "[redacted]"}) == set()
    assert keys({**item, "loc": ["body", "email"], "input": "not-an-address"}) == set()
    assert keys({**item, "loc": ["body", "name"], "input": {**sent, "password": "[redacted]"}}) == set()


def test_leaks_and_server_exceptions_are_recognised() -> None:
    output = 'ok\n{"message": "key thal_abc"}\n{"hash": "$argon2id$v=19$m=19456"}\n'
    assert len(leaked_secrets(output, {"API key": "thal_abc", "password": "Pw-1!"})) == 2
    traceback = (
        'Traceback (most recent call last):\n  File "/x/src/thallus/audit/store.py", line 109, in query\n'
        "OverflowError: value out of int64 range\n\nThe above exception was the direct cause of the following:\n\n"
        '  File "/venv/sqlalchemy/engine/base.py", line 1, in execute\n'
        "sqlalchemy.exc.DBAPIError: (sqlalchemy.dialects.postgresql.asyncpg.Error) invalid input\n"
        "(Background on this error at: https://sqlalche.me/e/21/dbapi)"
    )
    entry = {"message": "unhandled exception: DBAPIError", "exception": traceback}
    assert server_exception(entry) == ("DBAPIError ← OverflowError", "thallus/audit/store.py:query")
    assert server_exception(None) == ("no exception logged", "")
    command = "curl -H 'Authorization: Bearer tok.en' -H 'X-API-Key: thal_k' http://x"
    assert without_secrets(command, {"tok.en": "TOKEN", "thal_k": "API_KEY"}) == (
        'curl -H "Authorization: Bearer $TOKEN" -H "X-API-Key: $API_KEY" http://x'
    )


def test_the_hostile_corpus_reaches_every_string_field() -> None:
    document = {
        "paths": {
            "/items/{item_id}": {
                "post": {
                    "parameters": [
                        {"name": "item_id", "in": "path", "schema": {"type": "string"}},
                        {"name": "cursor", "in": "query", "schema": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
                        {"name": "limit", "in": "query", "schema": {"type": "integer"}},
                    ],
                    "requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/B"}}}},
                }
            }
        },
        "components": {"schemas": {"B": {"properties": {"email": {"type": "string"}, "n": {"type": "integer"}}}}},
    }
    entries = hostile_corpus(document, "/items/{item_id}", "POST")
    assert {"path_parameters": {"item_id": "\x00"}} in entries
    assert {"path_parameters": {"item_id": "corpus"}, "query": {"cursor": "corpus\x00"}} in entries
    big = {"path_parameters": {"item_id": "corpus"}, "query": {"cursor": "eyJiZWZvcmUiOiA5MjIzMzcyMDM2ODU0Nzc1ODA4fQ"}}
    assert big in entries  # {"before": 2**63}
    bodies = [entry["body"] for entry in entries if "body" in entry]
    assert {"email": "\ud800"} in bodies
    assert {"email": "corpus\x00@example.com"} in bodies
    assert not any("limit" in entry.get("query", {}) or "n" in entry.get("body", {}) for entry in entries)
