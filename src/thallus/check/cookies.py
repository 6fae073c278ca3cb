"""Cookies (RFC 6265bis; docs/design.md §6): the attributes of every ``Set-Cookie`` the scan saw.

A session-like cookie (its name holds ``sess``, ``login``, ``auth``, ``token``, ``refresh``, ``sid``
or ``jwt``) must be ``HttpOnly`` and, outside development, ``Secure`` (Observatory's session-cookie
tests); every cookie needs a valid ``SameSite``; the ``__Secure-`` and ``__Host-`` prefixes must keep
their promises (RFC 6265bis §4.1.3), or browsers drop the cookie.
"""

from __future__ import annotations

from dataclasses import dataclass

from thallus.check.model import Answers, Result, Status, Target

LAYER = "cookies"
#: Rows at most; a target setting more cookie names gets one more row saying so.
MAX_ROWS = 20
SESSION_HINTS = ("sess", "login", "auth", "token", "refresh", "sid", "jwt")
SAME_SITE = ("strict", "lax", "none")


@dataclass(frozen=True)
class SetCookie:
    name: str
    attributes: dict[str, str]  # lower-case names; flags map to ""

    @property
    def session(self) -> bool:
        lowered = self.name.lower()
        return any(hint in lowered for hint in SESSION_HINTS) and "csrf" not in lowered and "xsrf" not in lowered


def parse(header: str) -> SetCookie:
    """RFC 6265bis §5.6: ``name=value`` then ``;``-separated attributes, the last of a name winning."""
    pair, *rest = header.split(";")
    attributes: dict[str, str] = {}
    for item in rest:
        name, _, value = item.strip().partition("=")
        if name.strip():
            attributes[name.strip().lower()] = value.strip()
    return SetCookie(pair.partition("=")[0].strip(), attributes)


def judge(cookie: SetCookie, target: Target) -> tuple[Status, list[str]]:
    """The worst problem and every problem of one cookie."""
    attributes = cookie.attributes
    secure, http_only = "secure" in attributes, "httponly" in attributes
    same_site = attributes.get("samesite")
    need_secure = target.env != "development" or target.scheme == "https"
    found: list[tuple[Status, str]] = []
    if cookie.name.startswith("__Secure-") and not secure:
        found.append((Status.FAIL, "__Secure- without Secure: browsers drop it"))
    if cookie.name.startswith("__Host-") and (not secure or attributes.get("path") != "/" or "domain" in attributes):
        found.append((Status.FAIL, "__Host- without Secure, Path=/ or with Domain: browsers drop it"))
    if not secure and need_secure:
        found.append((Status.FAIL if cookie.session else Status.WARN, "not Secure"))
    if not http_only and cookie.session:
        found.append((Status.FAIL, "no HttpOnly (script can read it)"))
    if same_site is None:
        found.append((Status.WARN, "no SameSite (browser defaults differ)"))
    elif same_site.lower() not in SAME_SITE:
        found.append((Status.FAIL, f"SameSite={same_site!r} is not Strict, Lax or None"))
    elif same_site.lower() == "none":
        found.append((Status.FAIL if not secure else Status.WARN, "SameSite=None: sent cross-site"))
    if cookie.session and target.env == "production" and not cookie.name.startswith(("__Host-", "__Secure-")):
        found.append((Status.WARN, "no __Host- or __Secure- prefix"))
    if cookie.session and "domain" in attributes:
        found.append((Status.WARN, f"Domain={attributes['domain']}: sent to subdomains"))
    status = max((status for status, _ in found), key=lambda status: status.rank, default=Status.PASS)
    return status, [text for _, text in found]


def describe(cookie: SetCookie) -> str:
    attributes = cookie.attributes
    shown = [flag for flag, name in (("Secure", "secure"), ("HttpOnly", "httponly")) if name in attributes]
    shown += [
        f"{label}={attributes[name]}"
        for label, name in (("SameSite", "samesite"), ("Path", "path"), ("Domain", "domain"))
        if name in attributes
    ]
    return "; ".join(shown) or "no attributes"


def analyse(target: Target, answers: Answers) -> list[Result]:
    seen: dict[str, list[SetCookie]] = {}
    for answer in answers.values():
        for header in answer.values("set-cookie"):
            cookie = parse(header)
            if cookie.name.startswith("thallus-check"):
                continue  # planted by our own injection probe: correlation reports it
            seen.setdefault(cookie.name[:64], []).append(cookie)
    if not seen:
        return [Result(LAYER, "set-cookie", Status.PASS, f"no Set-Cookie in {len(answers)} answers")]
    rows = []
    if len(seen) > MAX_ROWS:
        reason = f"{len(seen)} cookie names set; the first {MAX_ROWS} are judged"
        rows.append(Result(LAYER, "set-cookie", Status.WARN, reason))
    for name, cookies in list(seen.items())[:MAX_ROWS]:
        judged = [(judge(cookie, target), cookie) for cookie in cookies]
        (status, problems), cookie = max(judged, key=lambda item: item[0][0].rank)
        reason = "; ".join(problems) if problems else describe(cookie)
        rows.append(Result(LAYER, name, status, f"{reason} ({describe(cookie)})" if problems else reason))
    return rows
