"""Content Security Policy, as a browser reads it (W3C CSP Level 3), judged like Mozilla's Observatory.

Parsing (CSP3 §2.2): a field holds one or more policies separated by ``,``; a policy holds
directives separated by ``;``; a repeated directive is ignored after its first occurrence. Every
enforced policy must allow a load, so a weakness counts only when *every* policy has it.

Judging: scripts come from ``script-src``, else ``default-src`` (CSP3 §6.8.3), and so do plugins
from ``object-src``; ``frame-ancestors`` has no fallback. ``'unsafe-inline'`` is void next to a
nonce or hash (CSP3 §6.7.3.2), and with ``'strict-dynamic'`` host and scheme sources are too.
"""

from __future__ import annotations

from dataclasses import dataclass

from thallus.check.model import Status

#: Sources that allow nearly any origin (the Observatory's "dangerously broad" list).
BROAD = frozenset({"*", "http:", "https:", "ftp:", "http://*", "https://*", "http://*.*", "https://*.*"})
NONCE_OR_HASH = ("'nonce-", "'sha256-", "'sha384-", "'sha512-")


@dataclass(frozen=True)
class Policy:
    directives: dict[str, tuple[str, ...]]

    def sources(self, name: str, fallback: str | None = "default-src") -> tuple[str, ...] | None:
        """The directive's source list, else its fallback's; None when neither is set (no restriction)."""
        if name in self.directives:
            return self.directives[name]
        return self.directives.get(fallback) if fallback else None


def parse(values: list[str]) -> list[Policy]:
    """Every policy in the field lines ``values`` (policies without a directive are dropped)."""
    policies = []
    for value in values:
        for serialized in value.split(","):
            directives: dict[str, tuple[str, ...]] = {}
            for token in serialized.split(";"):
                parts = token.split()
                if parts and parts[0].lower() not in directives:
                    directives[parts[0].lower()] = tuple(part.lower() for part in parts[1:])
            if directives:
                policies.append(Policy(directives))
    return policies


def problems(policies: list[Policy], *, https: bool) -> list[tuple[Status, str]]:
    """The weaknesses every one of ``policies`` shares, worst first."""
    if not policies:
        return [(Status.FAIL, "no directive could be parsed")]
    shared = _problems(policies[0], https=https)
    for policy in policies[1:]:
        others = _problems(policy, https=https)
        shared = [problem for problem in shared if problem in others]
    return sorted(shared, key=lambda problem: -problem[0].rank)


def _problems(policy: Policy, *, https: bool) -> list[tuple[Status, str]]:
    found: list[tuple[Status, str]] = []
    scripts = policy.sources("script-src")
    if scripts is None:
        found.append((Status.FAIL, "no script-src or default-src: scripts from anywhere"))
    else:
        found.extend(_script_problems(scripts))
    objects = policy.sources("object-src")
    if objects is None or BROAD.intersection(objects):
        found.append((Status.FAIL, "object-src unrestricted: plugins from anywhere"))
    elif "object-src" not in policy.directives and objects != ("'none'",):
        found.append((Status.WARN, "no object-src (falls back to default-src; set object-src 'none')"))
    ancestors = policy.sources("frame-ancestors", fallback=None)
    if ancestors is None:
        found.append((Status.WARN, "no frame-ancestors (framing left to X-Frame-Options)"))
    elif BROAD.intersection(ancestors):
        found.append((Status.FAIL, "frame-ancestors allows any origin"))
    if https and any(
        source.startswith(("http:", "ftp:")) for sources in policy.directives.values() for source in sources
    ):
        found.append((Status.WARN, "http: sources on an https site"))
    return found


def _script_problems(scripts: tuple[str, ...]) -> list[tuple[Status, str]]:
    found: list[tuple[Status, str]] = []
    keyed = any(source.startswith(NONCE_OR_HASH) for source in scripts)
    strict_dynamic = keyed and "'strict-dynamic'" in scripts
    if "'unsafe-inline'" in scripts and not keyed:
        found.append((Status.FAIL, "'unsafe-inline' in script-src"))
    if "data:" in scripts:
        found.append((Status.FAIL, "data: in script-src"))
    broad = sorted(BROAD.intersection(scripts))
    if broad and not strict_dynamic:
        found.append((Status.FAIL, f"{broad[0]} in script-src: scripts from any origin"))
    if "'unsafe-eval'" in scripts:
        found.append((Status.WARN, "'unsafe-eval' in script-src"))
    return found


def summary(policy: Policy) -> str:
    """The directives that matter most, for a PASS row."""
    shown = ("default-src", "script-src", "object-src", "frame-ancestors")
    return "; ".join(f"{name} {' '.join(policy.directives[name])}" for name in shown if name in policy.directives)
