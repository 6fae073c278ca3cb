"""Support for tests/test_schema_fuzz.py: a drained ``thallus serve``, real accounts, the response
checks of docs/design.md §3/§7/§8, hostile requests, and failure reports that can be replayed with curl.

* :func:`live_server` runs ``thallus serve`` (through :func:`tests.server.running_server`) and drains
  its stdout on a thread as it comes: a fuzz run logs far more than a pipe holds, and a full pipe
  would stall the server's logging and with it every request (so the output is collected here rather
  than read with ``Server.output()`` at the end). The JSON log is searched by correlation ID for a
  failed request's exception, and checked at the end for leaked secrets (:func:`leaked_secrets`).
* :func:`header_problems` and :func:`error_problems` are the checks run on every response.
* :func:`hostile_corpus` is the fixed set of hostile requests for an operation, built from the OpenAPI
  document; :func:`hostile_cases` wraps a schemathesis strategy so that generated cases carry the same
  characters (lone surrogates and NUL in JSON string fields, NUL in query and path parameters) and
  well-formed cursors with hostile values.
* :class:`Finding` is one distinct failure with its curl reproduction; :func:`failure_type` gives
  each failure signature its own exception class, so Hypothesis keeps (and shrinks) every distinct
  failure of an operation separately instead of reporting only the first.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
from hypothesis import strategies as st
from schemathesis import Case, Response

from tests.server import THALLUS, Server, running_server

PUBLIC_ORIGIN = "https://api.example.com"
APP_ORIGIN = "https://app.example.com"
#: Origin evidence on every request: what a browser on the service's own page sends (docs/design.md §5).
SAME_ORIGIN = {"Origin": PUBLIC_ORIGIN, "Sec-Fetch-Site": "same-origin"}
SECRET_KEY = "schema-fuzz-" + "0123456789abcdef" * 2 + "-secret"
ADMIN_EMAIL = "fuzz-admin@example.com"
PASSWORD = "Fuzz-Horse-Battery-7!"
CHEAP_ARGON2 = {
    "THALLUS_ARGON2_TIME_COST": "1",
    "THALLUS_ARGON2_MEMORY_COST": "19456",
    "THALLUS_ARGON2_PARALLELISM": "1",
}

#: docs/design.md §7: what a valid correlation ID looks like.
CORRELATION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
BASELINE_CSP = "default-src 'self'; object-src 'none'; base-uri 'self'; frame-ancestors 'none'; form-action 'self'"
#: docs/design.md §3: header → the exact value on every API response (the service's defaults).
EXACT_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "x-xss-protection": "1; mode=block",
    "referrer-policy": "strict-origin-when-cross-origin",
    "content-security-policy": BASELINE_CSP,
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-site",
    "x-permitted-cross-domain-policies": "none",
}
PERMISSIONS_POLICY_START = "camera=(), microphone=()"
HSTS = "max-age=31536000"
AUTH_PATH = "/api/v1/auth"
ERROR_FIELDS = {"error", "message", "details", "correlation_id"}
VALIDATION_DETAIL_FIELDS = {"type", "loc", "msg", "input"}
#: docs/design.md §8: the ``error`` type of each listed status.
ERROR_TYPES: dict[int, frozenset[str]] = {
    400: frozenset({"BadRequestError"}),
    401: frozenset({"AuthenticationError"}),
    403: frozenset({"PermissionDeniedError", "CSRFError", "CORSError"}),
    404: frozenset({"NotFoundError"}),
    405: frozenset({"MethodNotAllowedError"}),
    409: frozenset({"ConflictError"}),
    413: frozenset({"PayloadTooLargeError"}),
    422: frozenset({"ValidationError"}),
    429: frozenset({"RateLimitError"}),
    500: frozenset({"InternalServerError"}),
}
SENSITIVE_FIELD = re.compile(r"pass(word|phrase)?|secret|token|api[_-]?key", re.I)

#: Characters a JSON string field may carry that a careless server cannot store, encode or log:
#: NUL (PostgreSQL text refuses it) and lone surrogates (valid JSON escapes, not encodable as UTF-8).
HOSTILE_JSON = ("\x00", "\ud800", "\udfff")
#: In a URL only NUL can be sent (a surrogate cannot be percent-encoded as UTF-8).
HOSTILE_URL = ("\x00",)

AnyCase = Case[Any]


# -- the server ---------------------------------------------------------------------------------


def fuzz_environment(data_dir: Path, database_url: str, *, production: bool = True) -> dict[str, str]:
    """A production configuration (or the test profile) the fuzzer is not throttled or locked out by."""
    return {
        "THALLUS_ENV": "production" if production else "test",
        "THALLUS_SECRET_KEY": SECRET_KEY,
        "THALLUS_PUBLIC_ORIGIN": PUBLIC_ORIGIN,
        "THALLUS_ALLOWED_ORIGINS": APP_ORIGIN,
        "THALLUS_DATABASE_URL": database_url,
        "THALLUS_DATA_DIR": str(data_dir),
        "THALLUS_DOCS_ENABLED": "true",  # the default, spelled out: the fuzzer reads /openapi.json
        "THALLUS_RATE_LIMIT": "100000/minute",
        "THALLUS_RATE_LIMIT_AUTH": "100000/minute",
        "THALLUS_LOCKOUT_THRESHOLD": "100000",
        **CHEAP_ARGON2,
    }


@dataclass
class LiveServer:
    """A running ``thallus serve`` whose output is collected as it is written."""

    server: Server
    production: bool

    @property
    def lines(self) -> list[str]:
        return self.server.lines

    @property
    def url(self) -> str:
        return self.server.url

    def entries(self, correlation_id: str) -> list[dict[str, Any]]:
        """The JSON log entries written for one request."""
        found = []
        for line in list(self.lines):
            if correlation_id not in line:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("correlation_id") == correlation_id:
                found.append(entry)
        return found

    def exception_of(self, correlation_id: str, wait: float = 2.0) -> dict[str, Any] | None:
        """The logged exception of a request that failed (the line may still be on its way)."""
        deadline = time.monotonic() + wait
        while True:
            for entry in self.entries(correlation_id):
                if "exception" in entry:
                    return entry
            if time.monotonic() > deadline:
                return None
            time.sleep(0.02)

    def finish(self) -> str:
        """Stop the server; everything it wrote."""
        return self.server.output()


@contextmanager
def live_server(env: Mapping[str, str]) -> Iterator[LiveServer]:
    with running_server(env) as server:  # it reads the server's output as it comes
        yield LiveServer(server, env.get("THALLUS_ENV") == "production")


def thallus_cli(env: Mapping[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """The ``thallus`` CLI with ``env`` and nothing of the shell's own ``THALLUS_*``."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("THALLUS_") or k.startswith("THALLUS_TEST_")}
    full.update(env)
    return subprocess.run(
        [THALLUS, *args], env=full, input=stdin, capture_output=True, text=True, timeout=120, check=False
    )


def create_user(env: Mapping[str, str], email: str, password: str, *flags: str) -> str:
    """``thallus users create`` (password on stdin, so it is in no process list); the user's id."""
    result = thallus_cli(env, "users", "create", "--email", email, "--password", "-", *flags, stdin=password + "\n")
    assert result.returncode == 0, result.stderr
    return result.stdout.split()[0]


def create_key(env: Mapping[str, str], email: str, name: str) -> str:
    """``thallus keys create``: the raw key (stdout is the key alone)."""
    result = thallus_cli(env, "keys", "create", "--email", email, "--name", name)
    assert result.returncode == 0, result.stderr
    raw = result.stdout.strip()
    assert raw.startswith("thal_"), result.stdout
    return raw


@dataclass(frozen=True)
class Session:
    access_token: str
    refresh_token: str


def login(base_url: str, email: str, password: str) -> Session:
    """Sign in over HTTP: the access token and the refresh cookie's value."""
    response = httpx.post(
        base_url + AUTH_PATH + "/login", json={"email": email, "password": password}, headers=SAME_ORIGIN, timeout=30
    )
    assert response.status_code == 200, response.text
    refresh = ""
    for cookie in response.headers.get_list("set-cookie"):
        name, _, rest = cookie.partition("=")
        if name.strip().endswith("thallus_refresh"):
            refresh = rest.split(";", 1)[0]
    assert refresh, response.headers
    return Session(response.json()["access_token"], refresh)


# -- checks ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One broken rule: ``key`` names it without the generated values (it identifies the failure), ``text``
    says what was seen."""

    key: str
    text: str


def _single(response: Response, name: str) -> str | None:
    values = response.headers.get(name)
    return values[0] if values else None


def header_problems(response: Response, *, production: bool) -> list[Problem]:
    """docs/design.md §3 (every response) and §7 (the correlation ID)."""
    problems = []
    for name, expected in EXACT_HEADERS.items():
        values = response.headers.get(name, [])
        if values != [expected]:
            problems.append(Problem(f"header {name}", f"{name}: expected [{expected!r}], got {values!r}"))
    permissions = response.headers.get("permissions-policy", [])
    if len(permissions) != 1 or not permissions[0].startswith(PERMISSIONS_POLICY_START):
        problems.append(
            Problem("header permissions-policy", f"permissions-policy: expected one value, got {permissions!r}")
        )
    hsts = response.headers.get("strict-transport-security", [])
    if hsts != ([HSTS] if production else []):
        expected = repr([HSTS]) if production else "none outside production"
        problems.append(
            Problem("header strict-transport-security", f"strict-transport-security: expected {expected}, got {hsts!r}")
        )
    ids = response.headers.get("x-correlation-id", [])
    if len(ids) != 1 or not CORRELATION_ID.fullmatch(ids[0]):
        problems.append(Problem("header x-correlation-id", f"x-correlation-id: expected one valid ID, got {ids!r}"))
    path = response.request.path_url.split("?", 1)[0]
    if response.status_code >= 400 or path.startswith(AUTH_PATH):
        cache = ", ".join(response.headers.get("cache-control", []))
        if "no-store" not in cache:
            problems.append(Problem("header cache-control", f"cache-control: expected no-store, got {cache!r}"))
    return problems


def _at(document: Any, path: Sequence[Any]) -> Any:
    """``document`` followed along ``path`` (a validation error's ``loc`` after ``"body"``), or ``None``."""
    for part in path:
        if (isinstance(document, dict) and part in document) or (
            isinstance(document, list) and isinstance(part, int) and 0 <= part < len(document)
        ):
            document = document[part]
        else:
            return None
    return document


def _echoed_secrets(echoed: Any, sent: Any, path: str = "") -> list[str]:
    """Paths of password-like fields whose sent value comes back verbatim in ``echoed`` (the ``input`` of a
    validation error that echoes the object holding them)."""
    found = []
    if isinstance(echoed, dict) and isinstance(sent, dict):
        for key, value in echoed.items():
            if key not in sent:
                continue
            if SENSITIVE_FIELD.search(str(key)) and value == sent[key] and sent[key] not in ("", None):
                found.append(f"{path}{key}")
            else:
                found += _echoed_secrets(value, sent[key], f"{path}{key}.")
    return found


def echo_problems(details: list[dict[str, Any]], sent: Any) -> list[Problem]:
    """docs/design.md §8: a 422's ``input`` never echoes a password that was sent."""
    echoed = []
    for item in details:
        loc = item["loc"]
        if not (isinstance(loc, list) and loc and loc[0] == "body"):
            continue
        path = loc[1:]
        value = _at(sent, path)
        if (
            any(SENSITIVE_FIELD.search(str(part)) for part in path)
            and value not in ("", None)
            and item["input"] == value
        ):
            echoed.append(".".join(str(part) for part in path))
        echoed += _echoed_secrets(item["input"], _at(sent, path[:-1]))
        echoed += _echoed_secrets(item["input"], sent)
    return [Problem("422 echoes a secret", f"details echo the sent {name}") for name in dict.fromkeys(echoed)]


def error_problems(response: Response, sent: Any) -> list[Problem]:
    """docs/design.md §8 for every error (status 400 and up): the JSON shape, its type and correlation ID."""
    status = response.status_code
    if status < 400:
        return []
    media_type = (_single(response, "content-type") or "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        return [Problem(f"{status} not JSON", f"content-type {media_type!r}, not application/json")]
    try:
        body = json.loads(response.content)
    except ValueError as exc:
        return [Problem(f"{status} body not JSON", f"the body does not parse: {exc}")]
    if not isinstance(body, dict) or set(body) != ERROR_FIELDS:
        keys = sorted(body) if isinstance(body, dict) else type(body).__name__
        return [Problem(f"{status} error shape", f"keys {keys}, expected {sorted(ERROR_FIELDS)}")]
    problems = []
    error = body["error"]
    allowed = ERROR_TYPES.get(status)
    if not isinstance(error, str) or (allowed is not None and error not in allowed) or not error.endswith("Error"):
        problems.append(Problem(f"{status} error type", f"error {error!r} for status {status}"))
    if not isinstance(body["message"], str) or not body["message"]:
        problems.append(Problem(f"{status} error message", f"message {body['message']!r}"))
    header = _single(response, "x-correlation-id")
    if body["correlation_id"] != header:
        problems.append(
            Problem(
                f"{status} correlation_id",
                f"body correlation_id {body['correlation_id']!r} is not the header's {header!r}",
            )
        )
    if error in ("CSRFError", "CORSError"):
        problems.append(Problem(f"{status} {error}", "refused although the request carries same-origin evidence"))
    if status == 429:
        problems.append(Problem("429", "throttled although the limits are 100000/minute: the run tests nothing"))
    if status == 422:
        details = body["details"]
        if not isinstance(details, list) or not all(
            isinstance(item, dict) and set(item) == VALIDATION_DETAIL_FIELDS for item in details
        ):
            problems.append(Problem("422 details", f"details are not a list of {sorted(VALIDATION_DETAIL_FIELDS)}"))
        else:
            problems += echo_problems(details, sent)
    return problems


# -- hostile test cases ----------------------------------------------------------------------------


def _cursor(value: object) -> str:
    """A cursor in the service's own encoding (``{"before": seq}`` as unpadded URL-safe base64)."""
    return base64.urlsafe_b64encode(json.dumps({"before": value}).encode()).decode().rstrip("=")


#: What a well-formed cursor may carry: any integer (shrinking finds the smallest one that fails), then the
#: other JSON values.
CURSOR_VALUES = st.one_of(
    st.integers(),
    st.booleans(),
    st.floats(allow_nan=False),
    st.none(),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=2),
)


def _insert(draw: st.DrawFn, text: str, alphabet: Sequence[str]) -> str:
    token = draw(st.sampled_from(alphabet))
    position = draw(st.integers(0, len(text)))
    return text[:position] + token + text[position:]


def _spoil(draw: st.DrawFn, values: Mapping[str, Any], alphabet: Sequence[str]) -> dict[str, Any]:
    """``values`` with a character of ``alphabet`` inserted into one of its string values."""
    names = sorted(name for name, value in values.items() if isinstance(value, str))
    if not names:
        return dict(values)
    name = draw(st.sampled_from(names))
    return {**values, name: _insert(draw, str(values[name]), alphabet)}


@st.composite
def _hostile(draw: st.DrawFn, case: AnyCase) -> AnyCase:
    body: Any = case.body
    query: dict[str, Any] | None = case.query
    path_parameters: dict[str, Any] | None = case.path_parameters
    if isinstance(body, dict) and draw(st.booleans()):
        body = _spoil(draw, body, HOSTILE_JSON)
    if query and draw(st.booleans()):
        query = _spoil(draw, query, HOSTILE_URL)
    if path_parameters and draw(st.booleans()):
        path_parameters = _spoil(draw, path_parameters, HOSTILE_URL)
    if any(parameter.name == "cursor" for parameter in case.operation.query) and draw(st.booleans()):
        query = {**(query or {}), "cursor": _cursor(draw(CURSOR_VALUES))}
    if body is case.body and query is case.query and path_parameters is case.path_parameters:
        return case
    # A new case without generation metadata: schemathesis would revalidate a modified case against the
    # schema, and its validator cannot take a lone surrogate.
    spoiled: AnyCase = case.operation.Case(
        method=case.method,
        path_parameters=path_parameters,
        headers=case.headers,
        cookies=case.cookies,
        query=query,
        body=body,
        media_type=case.media_type,
    )
    return spoiled


#: Cursor values every run tries (the random ones may miss them): the 64-bit edges, a bool (an ``int`` to
#: Python), and the other JSON types.
CORPUS_CURSORS: tuple[object, ...] = (2**63 - 1, 2**63, 2**64, 10**30, -(2**63) - 1, True, False, 1.5, "1", None, [1])
PLAUSIBLE_PASSWORD = "Corpus-Horse-Battery-1!"


def _resolve(document: Mapping[str, Any], schema: Mapping[str, Any]) -> Mapping[str, Any]:
    while "$ref" in schema:
        target: Any = document
        for part in str(schema["$ref"]).removeprefix("#/").split("/"):
            target = target[part]
        schema = target
    return schema


def _is_string(document: Mapping[str, Any], schema: Mapping[str, Any]) -> bool:
    schema = _resolve(document, schema)
    return schema.get("type") == "string" or any(_is_string(document, item) for item in schema.get("anyOf", ()))


def _plausible(name: str, token: str = "") -> str:
    """A value that passes the field's own rules, with ``token`` in it (before the ``@`` of an address)."""
    if "email" in name:
        return f"corpus{token}@example.com"
    if "password" in name:
        return PLAUSIBLE_PASSWORD + token
    if name.endswith("_at") or name.endswith("_date"):
        return "2030-01-01T00:00:00Z" + token
    return "corpus" + token


def hostile_corpus(document: Mapping[str, Any], path: str, method: str) -> list[dict[str, Any]]:
    """The hostile requests every run sends to one operation, whatever Hypothesis draws (``Case`` keyword
    arguments): each JSON string field alone with each of :data:`HOSTILE_JSON`, and again among plausible
    values of the other fields; NUL in each string query and path parameter; each of :data:`CORPUS_CURSORS`."""
    operation = document["paths"][path][method.lower()]
    parameters = operation.get("parameters", [])
    path_parameters = {item["name"]: "corpus" for item in parameters if item["in"] == "path"}
    entries: list[dict[str, Any]] = []
    for item in parameters:
        if not _is_string(document, item.get("schema", {})):
            continue
        if item["in"] == "path":
            entries.append({"path_parameters": {**path_parameters, item["name"]: "\x00"}})
        elif item["in"] == "query":
            entries.append({"path_parameters": path_parameters, "query": {item["name"]: "corpus\x00"}})
            if item["name"] == "cursor":
                entries += [
                    {"path_parameters": path_parameters, "query": {"cursor": _cursor(value)}}
                    for value in CORPUS_CURSORS
                ]
    content = operation.get("requestBody", {}).get("content", {}).get("application/json")
    if content is not None:
        properties = _resolve(document, content["schema"]).get("properties", {})
        strings = [name for name, schema in properties.items() if _is_string(document, schema)]
        for name in strings:
            for token in HOSTILE_JSON:
                entries.append({"path_parameters": path_parameters, "body": {name: token}})
                body = {other: _plausible(other) for other in strings}
                body[name] = _plausible(name, token)
                entries.append({"path_parameters": path_parameters, "body": body})
        for entry in entries:
            if "body" in entry:
                entry["media_type"] = "application/json"
    return entries


def hostile_cases(cases: st.SearchStrategy[AnyCase]) -> st.SearchStrategy[AnyCase]:
    """Each case of ``cases``, or the same case with one hostile character or cursor in it."""
    return cases.flatmap(_hostile)


# -- failures and the report ---------------------------------------------------------------------------


@dataclass
class Finding:
    """One distinct failure of one operation, in its minimal (shrunk) form."""

    operation: str
    run: str
    signature: tuple[str, ...]
    status: int | None
    problems: list[Problem]
    request: str
    response_body: str
    correlation_id: str | None
    flaky: bool = False
    log: list[dict[str, Any]] = field(default_factory=list)

    def title(self) -> str:
        status = self.status if self.status is not None else "no response"
        flaky = " (flaky: did not fail again on replay)" if self.flaky else ""
        return f"{self.operation} → {status} [{self.run}]{flaky}: {'; '.join(self.signature)}"


class FuzzFailureError(AssertionError):
    def __init__(self, finding: Finding) -> None:
        super().__init__(finding.title())
        self.finding = finding


_FAILURE_TYPES: dict[tuple[str, ...], type[FuzzFailureError]] = {}


def failure_type(signature: tuple[str, ...]) -> type[FuzzFailureError]:
    """One exception class per failure signature: Hypothesis tells failures apart by exception type and
    raising line, so each signature is shrunk and reported as its own failure."""
    cls = _FAILURE_TYPES.get(signature)
    if cls is None:
        digest = hashlib.sha256(repr(signature).encode()).hexdigest()[:12]
        cls = cast(type[FuzzFailureError], type(f"FuzzFailure_{digest}", (FuzzFailureError,), {}))
        _FAILURE_TYPES[signature] = cls
    return cls


def findings_in(exc: BaseException, *, flaky: bool = False) -> list[Finding]:
    """The findings carried by what Hypothesis raised (one failure, a group of them, or a flaky group)."""
    from hypothesis.errors import Flaky

    flaky = flaky or isinstance(exc, Flaky)
    if isinstance(exc, FuzzFailureError):
        exc.finding.flaky = flaky
        return [exc.finding]
    if isinstance(exc, BaseExceptionGroup):
        return [finding for inner in exc.exceptions for finding in findings_in(inner, flaky=flaky)]
    return []


def distinct_findings(findings: Sequence[Finding]) -> list[Finding]:
    """One finding per operation and signature (positive and negative data often find the same failure):
    the shortest reproduction, naming every run that found it."""
    kept: dict[tuple[str, tuple[str, ...]], Finding] = {}
    runs: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for finding in findings:
        key = (finding.operation, finding.signature)
        runs.setdefault(key, []).append(finding.run)
        if key not in kept or len(finding.request) < len(kept[key].request):
            kept[key] = finding
    for key, finding in kept.items():
        finding.run = " | ".join(dict.fromkeys(runs[key]))
    return list(kept.values())


_RAISED = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Warning|Exit|Interrupt|Group)):(.*)$", re.M)
_FRAME = re.compile(r'File "[^"]*/(thallus/[^"]+)", line (\d+), in (\S+)')


def server_exception(entry: dict[str, Any] | None) -> tuple[str, str]:
    """``(exception, innermost thallus frame)`` of a logged traceback: the exception raised last, and the
    root of its chain when that differs, e.g. ``("DBAPIError ← OverflowError", "thallus/audit/store.py:query")``."""
    if entry is None:
        return "no exception logged", ""
    text = str(entry.get("exception", ""))
    raised = [name.rsplit(".", 1)[-1] for name, _ in _RAISED.findall(text)]
    if not raised:
        kind = str(entry.get("message", "unknown"))
    elif raised[0] != raised[-1]:
        kind = f"{raised[-1]} ← {raised[0]}"
    else:
        kind = raised[-1]
    frames = _FRAME.findall(text)
    frame = f"{frames[-1][0]}:{frames[-1][2]}" if frames else ""
    return kind, frame


def without_secrets(command: str, variables: Mapping[str, str]) -> str:
    """``command`` with each credential (value → variable) as a shell variable that double quotes expand."""
    for value, variable in variables.items():
        command = re.sub("'([^']*)" + re.escape(value) + "([^']*)'", rf'"\1${variable}\2"', command)
        command = command.replace(value, f"${variable}")
    return command


def curl_command(case: AnyCase, response: Response | None, base_url: str, variables: Mapping[str, str]) -> str:
    """The request as curl, with the run's credentials as shell variables (``$TOKEN``, ``$API_KEY``)."""
    headers = dict(response.request.headers) if response is not None else None
    return without_secrets(case.as_curl_command(headers=headers, base_url=base_url), variables)


def _log_line(entry: dict[str, Any]) -> str:
    """A log entry in brief: its message, the thallus frames of its traceback and the exceptions raised."""
    line = f"{entry.get('time', '')} {entry.get('level', '')} {entry.get('logger', '')}: {entry.get('message', '')}"
    text = str(entry.get("exception", ""))
    for path, line_number, function in _FRAME.findall(text):
        line += f"\n        at {path}:{line_number} in {function}"
    for name, message in _RAISED.findall(text):
        line += f"\n        {name}:{message[:300]}"
    return line


def format_report(findings: Sequence[Finding], leaks: Sequence[str], statuses: Mapping[str, Mapping[int, int]]) -> str:
    parts = []
    if findings:
        parts.append(f"{len(findings)} distinct failure(s) (each in its minimal form after shrinking):")
        for number, finding in enumerate(findings, 1):
            lines = [f"[{number}] {finding.title()}"]
            lines += [f"    - {problem.text}" for problem in finding.problems]
            lines.append(f"    reproduce: {finding.request}")
            body = finding.response_body
            lines.append(f"    response body: {body[:600]}{'…' if len(body) > 600 else ''}")
            if finding.log:
                lines.append(f"    server log (correlation ID {finding.correlation_id}):")
                lines += [f"      {_log_line(entry)}" for entry in finding.log]
            parts.append("\n".join(lines))
    if leaks:
        parts.append("secrets in the server log:\n" + "\n".join(f"    - {leak}" for leak in leaks))
    parts.append("statuses seen per operation:\n" + status_table(statuses))
    return "\n\n".join(parts)


def status_table(statuses: Mapping[str, Mapping[int, int]]) -> str:
    return "\n".join(
        f"    {operation}: " + ", ".join(f"{status}×{count}" for status, count in sorted(counts.items()))
        for operation, counts in statuses.items()
    )


def leaked_secrets(output: str, secrets: Mapping[str, str]) -> list[str]:
    """Log lines that carry one of ``secrets`` (name → value) or an Argon2id hash."""
    leaks = []
    for number, line in enumerate(output.splitlines(), 1):
        for name, value in secrets.items():
            if value and value in line:
                leaks.append(f"line {number} contains the {name}: {line[:300]}")
        if "$argon2id$" in line:
            leaks.append(f"line {number} contains an Argon2id hash: {line[:300]}")
    return leaks
