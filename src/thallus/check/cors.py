"""CORS (docs/design.md §4; WHATWG Fetch §3.2): only listed origins are granted, never by reflection.

Probes, all to the scanned URL: a preflight (``OPTIONS`` with ``Origin`` and
``Access-Control-Request-Method: POST``) and a plain ``GET`` from a random foreign origin; a
preflight from ``null``; and for each ``--allowed-origin``, a preflight and a ``GET`` from it (the
positive control) and preflights from its look-alikes — a suffix (``https://app.example.com.evil.example``),
a prefix (``https://evilapp.example.com``), the ``http://`` downgrade and, for a one-label pattern
``https://*.example.com``, a name two labels deep. A look-alike the allowlist itself matches is
not sent. Preflights carry no credentials, as browsers send them.
"""

from __future__ import annotations

import re

from thallus.check.baseline import SUCCESS
from thallus.check.model import Answer, Answers, Probe, Result, Status, Target

LAYER = "cors"
FOREIGN_PREFLIGHT = "cors-foreign-preflight"
FOREIGN_GET = "cors-foreign-get"
NULL_PREFLIGHT = "cors-null-preflight"
LOOKALIKES = ("lookalike-suffix", "lookalike-prefix", "http-downgrade", "pattern-depth")
#: Requests per allowed origin at most: a preflight and a GET from it, four look-alike preflights.
PER_ORIGIN = 2 + len(LOOKALIKES)
_ORIGIN = re.compile(r"(https?)://(\*\.)?([^/:]+)(:[0-9]+)?")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def _preflight(key: str, target: Target, origin: str) -> Probe:
    headers = (
        ("Origin", origin),
        ("Access-Control-Request-Method", "POST"),
        ("Access-Control-Request-Headers", "content-type"),
    )
    return Probe(key, "OPTIONS", target.path, headers)


def _get(key: str, target: Target, origin: str) -> Probe:
    return Probe(key, "GET", target.path, (("Origin", origin), *target.credentials()))


def sample(allowed: str) -> str:
    """An origin ``allowed`` grants: itself, or for a pattern one label under it."""
    match = _ORIGIN.fullmatch(allowed)
    if match is None or not match.group(2):
        return allowed
    scheme, _, name, port = match.groups()
    return f"{scheme}://thallus-check.{name}{port or ''}"


def lookalikes(allowed: str) -> dict[str, str]:
    """The look-alike origins of ``allowed`` by kind (design.md §4 rule 6's examples)."""
    match = _ORIGIN.fullmatch(allowed)
    if match is None:
        return {}
    scheme, pattern, name, port = match.groups()
    port = port or ""
    host = f"thallus-check.{name}" if pattern else name
    found = {
        "lookalike-suffix": f"{scheme}://{host}.evil.example{port}",
        "lookalike-prefix": f"{scheme}://evil{name}{port}",
    }
    if scheme == "https":
        found["http-downgrade"] = f"http://{host}{port}"
    if pattern:
        found["pattern-depth"] = f"{scheme}://deeper.{host}{port}"
    return found


def matches(allowed: str, origin: str) -> bool:
    """Whether the allowlist entry ``allowed`` grants ``origin`` (exact, or one label under a pattern)."""
    match, seen = _ORIGIN.fullmatch(allowed), _ORIGIN.fullmatch(origin)
    if match is None or seen is None or not match.group(2):
        return allowed.lower() == origin.lower()
    if (match.group(1), match.group(4)) != (seen.group(1), seen.group(4)) or seen.group(2):
        return False
    label, dot, rest = seen.group(3).lower().partition(".")
    return bool(dot) and rest == match.group(3).lower() and _LABEL.fullmatch(label) is not None


def _key(kind: str, allowed: str) -> str:
    return f"cors-{kind} {allowed}"


def probes(target: Target) -> list[Probe]:
    foreign = target.foreign_origin
    planned = [
        _preflight(FOREIGN_PREFLIGHT, target, foreign),
        _get(FOREIGN_GET, target, foreign),
        _preflight(NULL_PREFLIGHT, target, "null"),
    ]
    for allowed in target.allowed_origins:
        planned.append(_preflight(_key("allowed-preflight", allowed), target, sample(allowed)))
        planned.append(_get(_key("allowed-get", allowed), target, sample(allowed)))
        for kind, origin in lookalikes(allowed).items():
            if not any(matches(entry, origin) for entry in target.allowed_origins):
                planned.append(_preflight(_key(kind, allowed), target, origin))
    return planned


def granted(answer: Answer) -> str | None:
    """The origin the answer grants: its one ``Access-Control-Allow-Origin`` (two are a network error)."""
    values = answer.values("access-control-allow-origin")
    return values[0].strip() if len(values) == 1 else None


def credentialed(answer: Answer) -> bool:
    return (answer.header("access-control-allow-credentials") or "").strip().lower() == "true"


def _origin_of(answer: Answer) -> str:
    return next((value for name, value in answer.probe.headers if name == "Origin"), "")


def _refusals(answers: Answers, target: Target) -> dict[str, list[Answer]]:
    found = {
        "foreign-origin": [answers[key] for key in (FOREIGN_PREFLIGHT, FOREIGN_GET) if key in answers],
        "null-origin": [answers[key] for key in (NULL_PREFLIGHT,) if key in answers],
    }
    for kind in LOOKALIKES:
        keys = [_key(kind, allowed) for allowed in target.allowed_origins]
        found[kind] = [answers[key] for key in keys if key in answers]
    return found


def _refusal_row(check: str, refused: list[Answer]) -> Result:
    """No answer grants the probing origin itself: that is reflection (Fetch §3.2.5)."""
    reflected = [answer for answer in refused if granted(answer) == _origin_of(answer)]
    if reflected:
        answer = reflected[0]
        with_credentials = credentialed(answer)
        reason = f"{_origin_of(answer)} is granted{' with credentials' if with_credentials else ''} on {answer.label}"
        return Result(LAYER, check, Status.FAIL, reason, critical=with_credentials)
    origins = sorted({_origin_of(answer) for answer in refused})
    statuses = sorted({str(answer.status) for answer in refused})
    starred = " (but * is: see wildcard-origin)" if any(granted(answer) == "*" for answer in refused) else ""
    return Result(LAYER, check, Status.PASS, f"{', '.join(origins)} not granted ({'/'.join(statuses)}){starred}")


def analyse(target: Target, answers: Answers) -> list[Result]:
    refusals = _refusals(answers, target)
    rows = [_refusal_row(check, refused) for check, refused in refusals.items() if refused]
    refused_answers = [answer for refused in refusals.values() for answer in refused]
    rows += [_wildcard(list(answers.values())), _credentials_to_refused(refused_answers), _vary(target, answers)]
    if target.allowed_origins:
        rows.append(_allowed(target, answers))
    return rows


def _wildcard(every: list[Answer]) -> Result:
    """``*`` with credentials is forbidden (Fetch §3.2.5) and betrays a hand-rolled policy."""
    starred = [answer for answer in every if granted(answer) == "*"]
    with_credentials = [answer for answer in starred if credentialed(answer)]
    if with_credentials:
        reason = f"Access-Control-Allow-Origin: * with credentials on {with_credentials[0].label}"
        return Result(LAYER, "wildcard-origin", Status.FAIL, reason, critical=True)
    if starred:
        reason = f"Access-Control-Allow-Origin: * on {starred[0].label}: any site may read it (without credentials)"
        return Result(LAYER, "wildcard-origin", Status.WARN, reason)
    return Result(LAYER, "wildcard-origin", Status.PASS, "never Access-Control-Allow-Origin: *")


def _credentials_to_refused(refused: list[Answer]) -> Result:
    """Credentials granted to an origin that is refused betray the same hand-rolled policy."""
    loose = [answer for answer in refused if credentialed(answer) and granted(answer) not in (_origin_of(answer), "*")]
    if loose:
        reason = f"Access-Control-Allow-Credentials: true for the refused {_origin_of(loose[0])} on {loose[0].label}"
        return Result(LAYER, "credentials-refused-origin", Status.WARN, reason)
    return Result(LAYER, "credentials-refused-origin", Status.PASS, "no credentials for a refused origin")


def _vary(target: Target, answers: Answers) -> Result:
    """An origin-dependent answer must say ``Vary: Origin`` (RFC 9110 §12.5.5; design.md §4 rule 12)."""

    def varies(answer: Answer) -> bool:
        return bool({"origin", "*"}.intersection(answer.tokens("vary")))

    specific = [answer for answer in answers.values() if granted(answer) not in (None, "*")]
    unvaried = [answer for answer in specific if not varies(answer)]
    if unvaried:
        reason = f"Access-Control-Allow-Origin {granted(unvaried[0])} without Vary: Origin on {unvaried[0].label}"
        return Result(LAYER, "vary-origin", Status.FAIL, reason)
    plain = answers[SUCCESS]
    if (specific or target.allowed_origins) and not varies(plain):
        reason = f"no Vary: Origin on {plain.label}: a cache may serve it to an allowed origin"
        return Result(LAYER, "vary-origin", Status.WARN, reason)
    if not specific:
        return Result(LAYER, "vary-origin", Status.PASS, "no answer depends on Origin")
    return Result(LAYER, "vary-origin", Status.PASS, "Vary: Origin on every answer that depends on it")


def _allowed(target: Target, answers: Answers) -> Result:
    """The positive control: an allowed origin is granted, by the preflight and the GET."""
    refused, granted_to = [], []
    for allowed in target.allowed_origins:
        origin = sample(allowed)
        pair = [answers[_key(kind, allowed)] for kind in ("allowed-preflight", "allowed-get")]
        missing = [answer for answer in pair if granted(answer) != origin]
        if missing:
            refused.append(f"{origin} on {missing[0].label}")
        else:
            granted_to.append(origin + ("" if all(credentialed(answer) for answer in pair) else " (no credentials)"))
    if refused:
        reason = f"not granted to {refused[0]}: is --allowed-origin what the service allows?"
        return Result(LAYER, "allowed-origin", Status.WARN, reason)
    return Result(LAYER, "allowed-origin", Status.PASS, f"granted to {', '.join(granted_to)}")
