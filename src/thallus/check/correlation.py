"""Correlation ID (docs/design.md §7): minted when absent, echoed when valid, replaced when hostile.

The success and 404 probes carry no ID: each answer must carry one, and not the same one. Four
more ``GET URL`` probes send ``X-Correlation-ID``: a valid ID (must come back unchanged, §7 rule 1),
an HTML/script payload, a percent-encoded CRLF that would inject ``Set-Cookie`` if decoded, and
1024 characters (over §7 rule 1's 128) — each of the last three must be replaced (rule 2) and
never reflected into the body. Every JSON error body must carry the answer's ID (rule 6).
"""

from __future__ import annotations

from thallus.check.baseline import NOT_FOUND, SUCCESS
from thallus.check.model import Answer, Answers, Probe, Result, Status, Target

LAYER = "correlation"
HEADER = "X-Correlation-ID"
VALID = "valid"
#: probe suffix → the value sent; the hostile ones must be replaced
HOSTILE = {
    "injected-html": "<script>alert(document.domain)</script>",
    "injected-crlf": "thallus-check%0d%0aSet-Cookie:%20thallus-check=injected",
    "oversized": "a" * 1024,
}


def _valid_id(target: Target) -> str:
    return f"thallus-check-{target.token}"


def probes(target: Target) -> list[Probe]:
    key = target.credentials()
    sent = {VALID: _valid_id(target), **HOSTILE}
    return [Probe(f"correlation-{name}", "GET", target.path, ((HEADER, value), *key)) for name, value in sent.items()]


def _id(answer: Answer) -> str | None:
    values = answer.values(HEADER)
    return values[0] if len(values) == 1 else None


def analyse(target: Target, answers: Answers) -> list[Result]:
    rows = [_generated(answers), _echoed(target, answers)]
    rows += [_replaced(name, value, answers[f"correlation-{name}"]) for name, value in HOSTILE.items()]
    rows.append(_in_errors(answers))
    return rows


def _generated(answers: Answers) -> Result:
    first, second = answers[SUCCESS], answers[NOT_FOUND]
    minted = [_id(first), _id(second)]
    if minted[0] is None or minted[1] is None:
        missing = first if minted[0] is None else second
        return Result(LAYER, "generated", Status.FAIL, f"no single {HEADER} on {missing.label}")
    if minted[0] == minted[1]:
        return Result(LAYER, "generated", Status.FAIL, f"the same ID {minted[0][:64]!r} on two requests")
    return Result(LAYER, "generated", Status.PASS, f"minted per request, e.g. {minted[0][:64]}")


def _echoed(target: Target, answers: Answers) -> Result:
    answer, sent = answers[f"correlation-{VALID}"], _valid_id(target)
    received = _id(answer)
    if received == sent:
        return Result(LAYER, "echoed", Status.PASS, f"a valid client ID comes back unchanged ({sent})")
    if received is None:
        return Result(LAYER, "echoed", Status.FAIL, f"no single {HEADER} on {answer.label}")
    return Result(LAYER, "echoed", Status.WARN, f"the valid client ID {sent} was replaced by {received[:64]!r}")


def _replaced(name: str, sent: str, answer: Answer) -> Result:
    """A hostile value is never used: it would reach logs, error bodies and the response (§7 rule 3)."""
    received = _id(answer)
    injected = [value for value in answer.values("set-cookie") if value.startswith("thallus-check=")]
    if injected:
        return Result(
            LAYER, name, Status.FAIL, f"the ID set a cookie: header injection on {answer.label}", critical=True
        )
    if received is not None and (received == sent or sent in received or "<script" in received.lower()):
        return Result(LAYER, name, Status.FAIL, f"echoed {sent[:40]!r}{'...' if len(sent) > 40 else ''} back")
    if sent.encode() in answer.body:
        return Result(LAYER, name, Status.FAIL, f"reflected into the body of {answer.label}")
    if received is None:
        return Result(LAYER, name, Status.FAIL, f"no single {HEADER} on {answer.label}")
    return Result(LAYER, name, Status.PASS, f"replaced by {received[:64]}")


def _in_errors(answers: Answers) -> Result:
    """Every JSON error body's ``correlation_id`` is the answer's ID (§7 rule 6, §8.1)."""
    errors = [answer for answer in answers.values() if answer.status >= 400]
    bodies = [answer for answer in errors if isinstance(answer.document, dict)]
    if not bodies:
        return Result(LAYER, "in-error-body", Status.FAIL, f"none of {len(errors)} error answers has a JSON body")
    for answer in bodies:
        document = answer.document
        assert isinstance(document, dict)
        found = document.get("correlation_id")
        if found is None:
            return Result(LAYER, "in-error-body", Status.FAIL, f"no correlation_id in the body of {answer.label}")
        if found != _id(answer):
            reason = f"correlation_id {str(found)[:40]!r} is not the {HEADER} of {answer.label}"
            return Result(LAYER, "in-error-body", Status.FAIL, reason)
    return Result(
        LAYER, "in-error-body", Status.PASS, f"correlation_id matches the header in {len(bodies)} error bodies"
    )
