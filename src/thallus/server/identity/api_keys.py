"""API keys: ``thal_`` + 32 random bytes (URL-safe base64), stored only as a keyed hash.

The preview ``thal_XXXX...YYYY`` identifies a key in lists without revealing it. Verification
results live in the identity view (:mod:`thallus.server.identity.view`): a revoked key stops working at
once on the instance that revoked it and within the view's bound (1 s) on every other instance;
expiry is checked on every request against the recorded expiry time. The last-used time is
buffered in memory and written in batches, never once per request.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime

PREFIX = "thal_"
PURPOSE = "api-key"
_SHAPE = re.compile(r"thal_[A-Za-z0-9_-]{43}")


def generate_api_key() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def is_well_formed(raw: str) -> bool:
    return _SHAPE.fullmatch(raw) is not None


def mask(raw: str) -> str:
    """``thal_XXXX...YYYY``: the first and last four characters of the random part."""
    return f"{PREFIX}{raw[len(PREFIX) : len(PREFIX) + 4]}...{raw[-4:]}"


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What a verification needs to know about a key and its user."""

    key_id: str
    user_id: str
    email: str
    name: str
    role: str
    expires_at: datetime | None
    usable: bool  # not revoked, user active


class LastUsedBuffer:
    """Newest use per key, written to the database in one batch every flush."""

    def __init__(self) -> None:
        self._pending: dict[str, datetime] = {}

    def touch(self, key_id: str, when: datetime) -> None:
        current = self._pending.get(key_id)
        if current is None or current < when:  # newest wins, even if the clock stepped back
            self._pending[key_id] = when

    def get(self, key_id: str) -> datetime | None:
        return self._pending.get(key_id)

    def drain(self) -> dict[str, datetime]:
        pending, self._pending = self._pending, {}
        return pending

    def restore(self, pending: dict[str, datetime]) -> None:
        for key_id, when in pending.items():
            if key_id not in self._pending or self._pending[key_id] < when:
                self._pending[key_id] = when
