"""Transport: was the scan made over TLS, and did the URL answer with a success to sample.

An ``https`` URL whose certificate did not verify never gets here (the scan stops, exit 2). A
plain-``http`` URL is fine on loopback (TLS is a proxy's job, design.md §12.2) and in development;
elsewhere it means the scan saw what a client without TLS sees. The URL itself should answer 2xx,
so that the headers of a success are judged, not those of a second error.
"""

from __future__ import annotations

from thallus.check.baseline import SUCCESS
from thallus.check.model import Answers, Result, Status, Target

LAYER = "transport"


def analyse(target: Target, answers: Answers) -> list[Result]:
    return [_https(target), _success(answers)]


def _success(answers: Answers) -> Result:
    answer = answers[SUCCESS]
    if 200 <= answer.status < 300:
        return Result(LAYER, "success", Status.PASS, f"{answer.label}")
    reason = f"{answer.label} is no success to sample: pass a URL that answers 2xx (or --api-key)"
    return Result(LAYER, "success", Status.WARN, reason)


def _https(target: Target) -> Result:
    if target.scheme == "https":
        return Result(LAYER, "https", Status.PASS, "TLS with a verified certificate")
    if target.loopback:
        return Result(LAYER, "https", Status.PASS, "plain http on loopback (TLS belongs to the proxy in front)")
    if target.env == "development":
        return Result(LAYER, "https", Status.PASS, "plain http (development)")
    reason = f"plain http in {target.env}: clients reaching it so are exposed; behind a TLS proxy, scan the https URL"
    return Result(LAYER, "https", Status.WARN, reason)
