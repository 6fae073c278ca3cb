"""The probes several layers read: a success, a 404, a 405, a 401 and a 400, all safe to send.

- ``success``: ``GET URL`` (with ``--api-key`` when given), no correlation ID, no ``Origin``;
- ``not-found``: ``GET /thallus-check-<token>``, a path no application routes;
- ``method-not-allowed``: ``TRACE URL`` — a safe method (RFC 9110 §9.2.1) that APIs do not serve;
- ``unauthorized``: ``GET URL`` with an invalid ``Authorization: Bearer`` token (RFC 6750 §3.1);
- ``bad-request``: ``GET URL?thallus-check=%00``, a NUL in the query, which careful APIs refuse.
"""

from __future__ import annotations

from thallus.check.model import Probe, Target

SUCCESS = "success"
NOT_FOUND = "not-found"
METHOD_NOT_ALLOWED = "method-not-allowed"
UNAUTHORIZED = "unauthorized"
BAD_REQUEST = "bad-request"
#: The error probes, in report order, with the status each is meant to provoke.
ERROR_PROBES = {NOT_FOUND: 404, METHOD_NOT_ALLOWED: 405, UNAUTHORIZED: 401, BAD_REQUEST: 400}
INVALID_BEARER = "Bearer thallus-check.invalid.token"


def probes(target: Target) -> list[Probe]:
    key = target.credentials()
    separator = "&" if "?" in target.path else "?"
    return [
        Probe(SUCCESS, "GET", target.path, key),
        Probe(NOT_FOUND, "GET", f"/thallus-check-{target.token}", key),
        Probe(METHOD_NOT_ALLOWED, "TRACE", target.path, key),
        Probe(UNAUTHORIZED, "GET", target.path, (("Authorization", INVALID_BEARER),)),
        Probe(BAD_REQUEST, "GET", f"{target.path}{separator}thallus-check=%00", key),
    ]
