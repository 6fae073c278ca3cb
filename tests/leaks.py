"""What must never appear in a log line, whoever wrote it: password hashes, raw API keys, JWTs."""

from __future__ import annotations

import re
from collections.abc import Iterable

LEAK_PATTERNS = (
    re.compile(r"\$argon2(id|i|d)\$"),
    re.compile(r"thal_[A-Za-z0-9_-]{43}"),
    re.compile(r"eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"),
)


def leaking_lines(lines: Iterable[str], secrets: Iterable[str] = ()) -> list[str]:
    """The lines (cut to 300 characters) that carry a secret or anything shaped like one."""
    known = [secret for secret in secrets if secret]
    return [
        line[:300]
        for line in lines
        if any(pattern.search(line) for pattern in LEAK_PATTERNS) or any(secret in line for secret in known)
    ]
