"""The one canonical form of an e-mail address (docs/design.md §9), and what a sign-in names.

Lookup, storage, uniqueness, the lockout key and audit details all go through
:func:`canonical_email`, so any spelling that resolves to an account also shares that account's
lockout (a lockout keyed on one normalisation and a lookup on another is a bypass):

1. NFKC — compatibility forms fold to their plain letters (``ｈａｎｋ@ｅｘａｍｐｌｅ.com`` is
   ``hank@example.com``, as full-width input from an IME would otherwise be another account);
2. surrounding whitespace (any Unicode whitespace) is dropped;
3. syntax per ``email-validator`` (no quoted local parts, no domain literals, no special-use
   domains); the domain is mapped by IDNA 2008 / UTS #46 and kept in its Unicode form, so
   ``xn--fa-hia.de`` and ``faß.de`` are one domain and ``fass.de`` another;
4. lower case (``str.lower``, not ``casefold``: ``straße`` and ``strasse`` stay two mailboxes).

The result is a fixed point — the canonical form of a canonical form is itself — which is what
makes "lookup(x) finds U ⇒ lockout_key(x) == lockout_key(U.email)" hold for every input.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from email_validator import EmailNotValidError, validate_email

#: RFC 5321 §4.5.3.1: 64 octets of local part, 255 of domain; 320 characters bounds any address.
MAX_LENGTH = 320


class InvalidEmailError(ValueError):
    """Text that is not a syntactically valid e-mail address; the message says why."""


def _canonical_once(text: str) -> str:
    folded = unicodedata.normalize("NFKC", text).strip()
    if len(folded) > MAX_LENGTH:
        raise InvalidEmailError(f"an e-mail address has at most {MAX_LENGTH} characters")
    try:
        normalized = validate_email(folded, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise InvalidEmailError(str(exc)) from None
    return normalized.lower()


def parse_email(text: str) -> str:
    """The canonical form of ``text``, or :class:`InvalidEmailError` saying why it is not an address."""
    if len(text) > 4 * MAX_LENGTH:  # never normalise megabytes
        raise InvalidEmailError(f"an e-mail address has at most {MAX_LENGTH} characters")
    canonical = _canonical_once(text)
    if _canonical_once(canonical) != canonical:  # lower-casing made a form that normalises again
        raise InvalidEmailError("the address has no stable canonical form")
    return canonical


def canonical_email(text: str) -> str | None:
    """The canonical form of ``text``, or ``None`` when it is not an address (it names no account)."""
    try:
        return parse_email(text)
    except InvalidEmailError:
        return None


@dataclass(frozen=True, slots=True)
class SignInName:
    """What a sign-in attempt named: an address in canonical form, or text that is none.

    ``lockout_subject`` is what the lockout counts: the canonical address, or — for text that is
    not an address and so matches no account — its folded form under a prefix no address can have.
    Text that is not an address (often a password typed into the wrong field) is never stored:
    audit details carry only a keyed hash of it (:meth:`audit_details`).
    """

    email: str | None
    lockout_subject: str

    @classmethod
    def of(cls, text: str) -> SignInName:
        email = canonical_email(text)
        if email is not None:
            return cls(email, email)
        folded = unicodedata.normalize("NFKC", text[: 4 * MAX_LENGTH]).strip().lower()
        # a lone surrogate cannot be encoded as it is; escaped, the subject stays one per input
        encodable = folded.encode("utf-8", "backslashreplace").decode("utf-8")
        return cls(None, "not-an-address:" + encodable)

    def audit_details(self, keyed_hash: Callable[[str], str]) -> dict[str, Any]:
        """``{"email": …, "identifier_valid": true}``, or for text that is not an address
        ``{"identifier_hash": …, "identifier_valid": false}`` — repeated attempts still correlate."""
        if self.email is not None:
            return {"email": self.email, "identifier_valid": True}
        return {"identifier_hash": keyed_hash(self.lockout_subject), "identifier_valid": False}
