"""Error shape (docs/design.md §8): every error is JSON with the same fields, uncached, without internals.

The baseline probes provoke a 404, a 405, a 401 and a 400; every other error answer of the scan
(refused preflights and CSRF probes, a 429) is compared too. The shape is design.md §8.1's
``{error, message, details, correlation_id}``; RFC 9457 problem details (``type``, ``title``) are
recognised as well. What matters across answers is that the fields are the same.
"""

from __future__ import annotations

from thallus.check.baseline import BAD_REQUEST, ERROR_PROBES, METHOD_NOT_ALLOWED, NOT_FOUND, UNAUTHORIZED
from thallus.check.model import Answer, Answers, Result, Status

LAYER = "errors"
#: Text that only a stack trace or a debug page contains.
INTERNALS = (
    "Traceback (most recent call last)",
    'File "/',
    "Exception in thread",
    "at java.",
    "at System.",
    "node_modules/",
    "DEBUG = True",
    "Werkzeug Debugger",
)
#: What the absence of the provoked status means (None: a weakness of its own).
NOT_PROVOKED = {
    UNAUTHORIZED: "not provoked: an invalid Bearer token was not refused here",
    BAD_REQUEST: "not provoked: a NUL in the query was accepted here",
    METHOD_NOT_ALLOWED: None,
    NOT_FOUND: None,
}


def fields(document: dict[str, object]) -> str:
    """The top-level field names, as ``{a, b}`` (the first twelve, each cut at 40 characters)."""
    names = sorted(name[:40] for name in document)
    return "{" + ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") + "}"


def shape(answer: Answer) -> tuple[Status, str]:
    """JSON (RFC 8259) with a type and a message, or RFC 9457 problem details."""
    if not answer.is_json:
        return Status.FAIL, f"{answer.media_type or 'untyped'} body, not JSON, on {answer.label}"
    document = answer.document
    if not isinstance(document, dict):
        return Status.FAIL, f"not a JSON object on {answer.label}"
    if {"error", "message"} <= document.keys():
        return Status.PASS, f"{answer.status} {str(document['error'])[:40]} {fields(document)}"
    if {"type", "title"} & document.keys():
        return Status.PASS, f"{answer.status} problem details (RFC 9457) {fields(document)}"
    return Status.WARN, f"JSON without an error type and message on {answer.label}: {fields(document)}"


def _provoked(key: str, expected: int, answer: Answer) -> Result:
    if 300 <= answer.status < 400:
        location = answer.header("location") or "nowhere"
        return Result(LAYER, key, Status.WARN, f"{answer.label} redirects to {location[:80]} (not followed)")
    if answer.status < 400:
        if NOT_PROVOKED[key] is not None:
            return Result(LAYER, key, Status.PASS, f"{NOT_PROVOKED[key]} ({answer.label})")
        if key == METHOD_NOT_ALLOWED:
            return Result(LAYER, key, Status.WARN, f"{answer.label}: TRACE is served (RFC 9110 §9.3.8: disable it)")
        return Result(LAYER, key, Status.WARN, f"an unknown path answered {answer.label}")
    status, reason = shape(answer)
    if answer.status != expected:
        reason += f" (expected {expected})"
    elif key == METHOD_NOT_ALLOWED and answer.header("allow") is None and status is Status.PASS:
        status, reason = Status.WARN, f"no Allow header on {answer.label} (RFC 9110 §15.5.6)"
    elif key == UNAUTHORIZED and answer.header("www-authenticate") is None and status is Status.PASS:
        status, reason = Status.WARN, f"no WWW-Authenticate header on {answer.label} (RFC 9110 §11.6.1)"
    return Result(LAYER, key, status, reason)


def analyse(answers: Answers) -> list[Result]:
    rows = [_provoked(key, expected, answers[key]) for key, expected in ERROR_PROBES.items()]
    errors = [answer for answer in answers.values() if answer.status >= 400]
    return [*rows, _consistent(errors), _no_store(errors), _internals(errors)]


def _consistent(errors: list[Answer]) -> Result:
    """One shape everywhere (§8): the same top-level fields on every error answer."""
    if not errors:
        return Result(LAYER, "consistent-fields", Status.WARN, "no error answer to compare")
    not_json = [answer for answer in errors if not isinstance(answer.document, dict) or not answer.is_json]
    if not_json:
        reason = f"{len(not_json)} of {len(errors)} error answers are not JSON objects, e.g. {not_json[0].label}"
        return Result(LAYER, "consistent-fields", Status.FAIL, reason)
    shapes: dict[str, list[Answer]] = {}
    for answer in errors:
        assert isinstance(answer.document, dict)
        shapes.setdefault(fields(answer.document), []).append(answer)
    if len(shapes) > 1:
        (first, a), (second, b) = list(shapes.items())[:2]
        reason = f"{a[0].label} has {first} but {b[0].label} has {second}"
        return Result(LAYER, "consistent-fields", Status.FAIL, reason)
    statuses = "/".join(sorted({str(answer.status) for answer in errors}))
    return Result(
        LAYER, "consistent-fields", Status.PASS, f"{next(iter(shapes))} on all {len(errors)} errors ({statuses})"
    )


def _no_store(errors: list[Answer]) -> Result:
    """Errors are not cached (RFC 9111 §5.2.2.5; design.md §8.1 rule 3)."""
    cached = [answer for answer in errors if "no-store" not in answer.tokens("cache-control")]
    if cached:
        reason = f"no Cache-Control: no-store on {len(cached)} of {len(errors)} errors, e.g. {cached[0].label}"
        return Result(LAYER, "no-store", Status.WARN, reason)
    return Result(LAYER, "no-store", Status.PASS, f"Cache-Control: no-store on all {len(errors)} errors")


def _internals(errors: list[Answer]) -> Result:
    """No stack trace or debug page (design.md §8.3 rule 1)."""
    for answer in errors:
        text = answer.body.decode("utf-8", "replace")
        marker = next((marker for marker in INTERNALS if marker in text), None)
        if marker is not None:
            return Result(LAYER, "no-internals", Status.FAIL, f"{marker!r} in the body of {answer.label}")
    return Result(LAYER, "no-internals", Status.PASS, "no stack trace or debug page in any error body")
