"""The scan: a fixed plan of probes, sent one after the other, then every layer's checks.

The plan is known before the first request (its length is the progress bar's total and is bounded
by :data:`MAX_REQUESTS`). Only the first answer can stop it: a redirect there means the URL is not
the API, so the scan ends with the redirect's target named, never following it.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urljoin, urlsplit

from thallus.check import baseline, cookies, correlation, cors, csrf, errors, headers, transport
from thallus.check.model import Answer, Answers, Probe, Result, ScanError, Target

#: ``--allowed-origin`` may be given this many times at most.
MAX_ALLOWED_ORIGINS = 10
#: Requests without allowed origins or CSRF: five baseline, four correlation, three CORS probes.
FIXED_REQUESTS = 5 + len(correlation.HOSTILE) + 1 + 3
#: The most a scan ever sends: 12 + 6 per allowed origin (at most 10) + 8 for CSRF = 80.
MAX_REQUESTS = FIXED_REQUESTS + cors.PER_ORIGIN * MAX_ALLOWED_ORIGINS + csrf.MAX_REQUESTS


def plan(target: Target) -> list[Probe]:
    planned = [*baseline.probes(target), *correlation.probes(target), *cors.probes(target), *csrf.probes(target)]
    assert len(planned) <= MAX_REQUESTS, len(planned)
    return planned


def run(target: Target, send: Callable[[Probe], Answer]) -> list[Result]:
    """Send the plan through ``send`` and judge the answers; :class:`ScanError` if the URL redirects."""
    answers: dict[str, Answer] = {}
    for probe in plan(target):
        answer = send(probe)
        if probe.key == baseline.SUCCESS and 300 <= answer.status < 400:
            raise ScanError(redirected(target, answer))
        answers[probe.key] = answer
    return analyse(target, answers)


def analyse(target: Target, answers: Answers) -> list[Result]:
    """Every layer's rows, in report order."""
    return [
        *transport.analyse(target, answers),
        *headers.analyse(target, answers),
        *cors.analyse(target, answers),
        *csrf.analyse(target, answers),
        *correlation.analyse(target, answers),
        *errors.analyse(answers),
        *cookies.analyse(target, answers),
    ]


def redirected(target: Target, answer: Answer) -> str:
    location = answer.header("location")
    if not location:
        return f"{target.url} answered {answer.status}, a redirect without Location: nothing to scan"
    resolved = urljoin(target.url, location.strip())
    parts = urlsplit(resolved)
    if (parts.hostname or "").lower() != target.host:
        where = "another host"
    elif parts.scheme != target.scheme:
        where = f"{parts.scheme} on the same host"
    else:
        where = "the same host"
    return (
        f"{target.url} answered {answer.status}, redirecting to {resolved[:200]} ({where}); "
        "redirects are not followed: scan that URL directly"
    )
