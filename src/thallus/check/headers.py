"""Security headers (docs/design.md §3) on a success, a 404 and the error answers.

Each header is judged on every sampled answer; a row takes the worst verdict and names the answer
it came from, so a header missing only on errors is caught (§3.1 rule 1). Values follow their
specifications and, where they overlap, Mozilla's HTTP Observatory (docs/check.md has the mapping).
"""

from __future__ import annotations

from collections.abc import Callable

from thallus.check import csp
from thallus.check.baseline import ERROR_PROBES, SUCCESS
from thallus.check.model import Answer, Answers, Result, Status, Target, worst

LAYER = "headers"
#: Observatory's threshold: six months (RFC 6797 leaves the value to the site).
HSTS_MINIMUM = 15_768_000
HSTS_PRELOAD_MINIMUM = 31_536_000
REFERRER_SAFE = frozenset({"no-referrer", "same-origin", "strict-origin", "strict-origin-when-cross-origin"})
REFERRER_UNSAFE = frozenset({"origin", "origin-when-cross-origin", "no-referrer-when-downgrade", "unsafe-url"})
COOP_VALUES = frozenset({"same-origin", "same-origin-allow-popups", "noopener-allow-popups", "unsafe-none"})
CORP_VALUES = frozenset({"same-origin", "same-site", "cross-origin"})
DISCLOSING = ("server", "x-powered-by", "x-aspnet-version", "x-aspnetmvc-version")

Verdict = tuple[Status, str]
Judge = Callable[[Answer, Target], Verdict]


def samples(answers: Answers) -> list[Answer]:
    """The success and every error probe that did provoke an error."""
    errors = [answers[key] for key in ERROR_PROBES if key in answers and answers[key].status >= 400]
    return [answers[SUCCESS], *errors]


def analyse(target: Target, answers: Answers) -> list[Result]:
    sampled = samples(answers)
    rows = [_across(check, judge, sampled, target) for check, judge in JUDGES]
    rows.append(_disclosure(sampled))
    return rows


def _across(check: str, judge: Judge, sampled: list[Answer], target: Target) -> Result:
    verdicts = [(answer, *judge(answer, target)) for answer in sampled]
    status = worst([verdict[1] for verdict in verdicts])
    reasons = {verdict[2] for verdict in verdicts}
    if len(reasons) == 1:
        every = f" (all {len(verdicts)} answers)" if len(verdicts) > 1 and status is not Status.PASS else ""
        reason = verdicts[0][2] + every
    elif status is Status.PASS:
        reason = f"{verdicts[0][2]} (the value differs between answers)"
    else:
        hits = [verdict for verdict in verdicts if verdict[1] is status]
        where = (
            hits[0][0].label if len(hits) == 1 else f"{len(hits)} of {len(verdicts)} answers, e.g. {hits[0][0].label}"
        )
        reason = f"{hits[0][2]} on {where}"
    return Result(LAYER, check, status, reason)


def _single(answer: Answer, name: str) -> tuple[str | None, str]:
    """The first value of a single-valued header, and a note when it was sent more than once (§3.1 rule 2)."""
    values = answer.values(name)
    if not values:
        return None, ""
    return values[0].strip(), (f"; sent {len(values)} times" if len(values) > 1 else "")


def nosniff(answer: Answer, target: Target) -> Verdict:
    """``nosniff`` (WHATWG Fetch §3.5): stops a browser sniffing a body into script or HTML."""
    value, repeated = _single(answer, "x-content-type-options")
    if value is None:
        return Status.FAIL, "missing: browsers may sniff a body into script or HTML"
    if value.lower() != "nosniff":
        return Status.FAIL, f"{value!r} is not nosniff"
    return (Status.WARN, f"nosniff{repeated}") if repeated else (Status.PASS, "nosniff")


def content_security_policy(answer: Answer, target: Target) -> Verdict:
    """An enforced CSP without unsafe sources (W3C CSP3; :mod:`thallus.check.csp`)."""
    enforced = answer.values("content-security-policy")
    if not enforced:
        if answer.values("content-security-policy-report-only"):
            return Status.FAIL, "only Content-Security-Policy-Report-Only: nothing is enforced"
        return Status.FAIL, "missing"
    policies = csp.parse(enforced)
    found = csp.problems(policies, https=target.scheme == "https")
    if found:
        return found[0][0], "; ".join(text for _, text in found)
    return Status.PASS, f"no unsafe source: {csp.summary(policies[0])}"


def framing(answer: Answer, target: Target) -> Verdict:
    """CSP ``frame-ancestors`` (which browsers prefer) or ``X-Frame-Options`` (RFC 7034; HTML §7.1.1)."""
    policies = csp.parse(answer.values("content-security-policy"))
    restricted = [policy.directives["frame-ancestors"] for policy in policies if "frame-ancestors" in policy.directives]
    xfo = answer.tokens("x-frame-options")
    xfo_note = (
        f" and X-Frame-Options {xfo[0].upper()}" if len(set(xfo)) == 1 and xfo[0] in ("deny", "sameorigin") else ""
    )
    if restricted:
        if all(csp.BROAD.intersection(sources) for sources in restricted):
            return Status.FAIL, "frame-ancestors allows any origin: framing allowed"
        return Status.PASS, f"frame-ancestors {' '.join(restricted[0])}{xfo_note}"
    if not xfo:
        return Status.FAIL, "no X-Frame-Options or CSP frame-ancestors: any site may frame it"
    if xfo_note:
        return Status.PASS, xfo_note.removeprefix(" and ") + " (no CSP frame-ancestors)"
    if xfo[0].startswith("allow-from"):
        return Status.FAIL, "X-Frame-Options ALLOW-FROM is obsolete and ignored: framing allowed"
    return Status.FAIL, f"X-Frame-Options {', '.join(xfo)!r} is not DENY or SAMEORIGIN: framing allowed"


def strict_transport_security(answer: Answer, target: Target) -> Verdict:
    """HSTS (RFC 6797 §6.1): required in production, at least six months, preload only when eligible."""
    value, repeated = _single(answer, "strict-transport-security")
    if value is None:
        if target.env == "production":
            return Status.FAIL, "missing in production"
        return Status.PASS, f"not sent (expected in production only; scanning as {target.env})"
    directives: dict[str, str] = {}
    for item in value.split(";"):
        name, _, argument = item.strip().partition("=")
        if name.strip():
            if name.strip().lower() in directives:
                return Status.FAIL, f"{value!r}: a directive appears twice (RFC 6797 §6.1)"
            directives[name.strip().lower()] = argument.strip().strip('"')
    if not directives.get("max-age", "").isdigit():
        return Status.FAIL, f"{value!r} has no valid max-age"
    max_age = int(directives["max-age"])
    over_http = " (over http: browsers heed it over https only, RFC 6797 §8.1)" if target.scheme == "http" else ""
    if max_age == 0:
        return Status.FAIL, "max-age=0 turns HSTS off"
    if max_age < HSTS_MINIMUM:
        return Status.WARN, f"max-age={max_age} is under six months ({HSTS_MINIMUM})"
    if "preload" in directives and ("includesubdomains" not in directives or max_age < HSTS_PRELOAD_MINIMUM):
        return Status.WARN, "preload without includeSubDomains and a year's max-age: preload lists refuse it"
    if repeated:
        return Status.WARN, f"max-age={max_age}{repeated} (browsers use the first)"
    return Status.PASS, f"{value}{over_http}"


def referrer_policy(answer: Answer, target: Target) -> Verdict:
    """The last recognised token wins (W3C Referrer Policy §8.1)."""
    tokens = answer.tokens("referrer-policy")
    if not tokens:
        return Status.WARN, "missing (browsers default to strict-origin-when-cross-origin; say so)"
    known = [token for token in tokens if token in REFERRER_SAFE | REFERRER_UNSAFE]
    if not known:
        return Status.WARN, f"{', '.join(tokens)!r} is not a referrer policy"
    if known[-1] in REFERRER_UNSAFE:
        return Status.WARN, f"{known[-1]} sends more than strict-origin-when-cross-origin would"
    return Status.PASS, known[-1]


def permissions_policy(answer: Answer, target: Target) -> Verdict:
    """W3C Permissions Policy: powerful features off for an API's pages (§3.2)."""
    items = answer.tokens("permissions-policy")
    if not items:
        return Status.WARN, "missing: no browser feature is turned off"
    return Status.PASS, f"{len(items)} features restricted"


def cross_origin_opener_policy(answer: Answer, target: Target) -> Verdict:
    """HTML §7.1.3: ``same-origin`` severs window references from other origins."""
    value = (answer.tokens("cross-origin-opener-policy") or [""])[0].split(";")[0].strip()
    if not value:
        return Status.WARN, "missing (defaults to unsafe-none)"
    if value not in COOP_VALUES:
        return Status.WARN, f"{value!r} is not a COOP value"
    return (Status.WARN, "unsafe-none") if value == "unsafe-none" else (Status.PASS, value)


def cross_origin_resource_policy(answer: Answer, target: Target) -> Verdict:
    """WHATWG Fetch §3.7: who may embed the response with a ``no-cors`` request."""
    value = (answer.tokens("cross-origin-resource-policy") or [""])[0]
    if not value:
        return Status.WARN, "missing (defaults to cross-origin: any site may embed responses)"
    if value not in CORP_VALUES:
        return Status.WARN, f"{value!r} is not a CORP value"
    return Status.PASS, value


def cross_domain_policies(answer: Answer, target: Target) -> Verdict:
    """Adobe's cross-domain policy files: ``none`` (or ``master-only``) refuses them."""
    value = (answer.tokens("x-permitted-cross-domain-policies") or [""])[0]
    if not value:
        return Status.WARN, "missing (policy files such as /crossdomain.xml are honoured)"
    if value in ("none", "master-only"):
        return Status.PASS, value
    return Status.WARN, f"{value} permits cross-domain policy files"


def xss_protection(answer: Answer, target: Target) -> Verdict:
    """The XSS auditor is gone from browsers; ``1`` without ``mode=block`` could be abused where it lived."""
    value, _ = _single(answer, "x-xss-protection")
    if value is None:
        return Status.PASS, "not sent (no current browser has the XSS auditor)"
    compact = value.replace(" ", "").lower()
    if compact == "0" or compact.startswith("1;mode=block"):
        return Status.PASS, value
    if compact.startswith("1"):
        return Status.WARN, f"{value!r} without mode=block (send 0 or 1; mode=block)"
    return Status.WARN, f"{value!r} is not recognised"


def _disclosure(sampled: list[Answer]) -> Result:
    """§3.1 rule 3: nothing that names the implementation."""
    seen = {f"{name}: {value}" for answer in sampled for name in DISCLOSING for value in answer.values(name)}
    if seen:
        return Result(LAYER, "server-disclosure", Status.WARN, f"{'; '.join(sorted(seen))} names the implementation")
    return Result(LAYER, "server-disclosure", Status.PASS, "no Server or X-Powered-By header")


JUDGES: tuple[tuple[str, Judge], ...] = (
    ("content-security-policy", content_security_policy),
    ("framing", framing),
    ("x-content-type-options", nosniff),
    ("strict-transport-security", strict_transport_security),
    ("referrer-policy", referrer_policy),
    ("permissions-policy", permissions_policy),
    ("cross-origin-opener-policy", cross_origin_opener_policy),
    ("cross-origin-resource-policy", cross_origin_resource_policy),
    ("x-permitted-cross-domain-policies", cross_domain_policies),
    ("x-xss-protection", xss_protection),
)
