"""CSRF (docs/design.md §5): a cookie-bearing unsafe request without trusted origin evidence is refused.

Only with ``--cookie`` and ``--csrf-endpoint``. Each probe is ``POST <endpoint>`` with the cookie,
an empty form body, and one kind of cross-site evidence: a foreign ``Origin``, ``Origin: null``,
``Sec-Fetch-Site: cross-site`` alone, a foreign ``Referer`` alone and — outside development — no
evidence at all (§5 rules 2–4). ``PUT``, ``PATCH`` and ``DELETE`` with a foreign ``Origin`` are sent
only with ``--allow-destructive``. A ``403`` is a refusal; any ``2xx`` means a forged request went
through. Pick an endpoint whose success does little harm (a logout); it runs only if CSRF is broken.
"""

from __future__ import annotations

from collections.abc import Callable

from thallus.check.model import Answer, Answers, Probe, Result, Status, Target

Headers = tuple[tuple[str, str], ...]

LAYER = "csrf"
FORM = ("Content-Type", "application/x-www-form-urlencoded")
DESTRUCTIVE = ("PUT", "PATCH", "DELETE")
#: check name → the evidence a cross-site browser request could carry (no cookie or form header yet)
EVIDENCE: dict[str, Callable[[Target], Headers]] = {
    "foreign-origin": lambda target: (("Origin", target.foreign_origin),),
    "null-origin": lambda target: (("Origin", "null"),),
    "cross-site-fetch": lambda target: (("Sec-Fetch-Site", "cross-site"),),
    "foreign-referer": lambda target: (("Referer", f"{target.foreign_origin}/thallus-check"),),
    "no-origin-evidence": lambda target: (),
}
#: At most this many requests: the five evidence kinds, and the three destructive methods.
MAX_REQUESTS = len(EVIDENCE) + len(DESTRUCTIVE)


def _cookie(target: Target) -> tuple[str, str]:
    return "Cookie", "; ".join(f"{name}={value}" for name, value in target.cookies)


def probes(target: Target) -> list[Probe]:
    if not target.csrf_probed or target.csrf_endpoint is None:
        return []
    base = (_cookie(target), FORM)
    planned = [
        Probe(f"csrf-{check}", "POST", target.csrf_endpoint, (*base, *evidence(target)))
        for check, evidence in EVIDENCE.items()
        if check != "no-origin-evidence" or target.env != "development"
    ]
    if target.allow_destructive:
        foreign = (("Origin", target.foreign_origin),)
        planned += [Probe(f"csrf-{method}", method, target.csrf_endpoint, (*base, *foreign)) for method in DESTRUCTIVE]
    return planned


def verdict(answer: Answer) -> tuple[Status, str]:
    """403 refused; 2xx accepted; anything else tells nothing about the origin check."""
    document = answer.document
    kind = f" {document['error'][:40]}" if isinstance(document, dict) and isinstance(document.get("error"), str) else ""
    if answer.status == 403:
        return Status.PASS, f"refused: 403{kind}"
    if 200 <= answer.status < 300:
        return Status.FAIL, f"accepted: {answer.label} ran with the cookie"
    if answer.status == 429:
        return Status.WARN, f"rate limited on {answer.label}: not tested, scan again later"
    return Status.WARN, f"{answer.label}{kind}: neither refused (403) nor accepted, cannot tell"


def analyse(target: Target, answers: Answers) -> list[Result]:
    if not target.csrf_probed:
        return []
    rows = []
    for check in EVIDENCE:
        answer = answers.get(f"csrf-{check}")
        if answer is None:
            reason = "not probed: development lets requests with no Origin, Referer or Sec-Fetch-Site through"
            rows.append(Result(LAYER, check, Status.PASS, reason))
            continue
        status, reason = verdict(answer)
        rows.append(Result(LAYER, check, status, reason, critical=status is Status.FAIL))
    methods = [answers[f"csrf-{method}"] for method in DESTRUCTIVE if f"csrf-{method}" in answers]
    if methods:
        verdicts = [verdict(answer) for answer in methods]
        status, reason = max(verdicts, key=lambda pair: pair[0].rank)
        if status is Status.PASS:
            reason = f"{', '.join(DESTRUCTIVE)} refused: 403"
        rows.append(Result(LAYER, "unsafe-methods", status, reason, critical=status is Status.FAIL))
    return rows
