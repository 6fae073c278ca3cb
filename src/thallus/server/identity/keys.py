"""Keys derived from the server secret, one per purpose, with rotation.

``THALLUS_SECRET_KEY`` is never used directly: each purpose (signing access tokens, hashing API
keys, hashing refresh tokens) gets its own key, HMAC-SHA256(secret, purpose), so one leak does not
hand over the others. During a rotation, ``THALLUS_PREVIOUS_SECRET_KEYS`` keep verifying what the
old secret made; only the current secret signs or hashes anything new.

In development without a configured secret, one is generated once and kept in
``THALLUS_DATA_DIR/secret_key`` (mode 0600), so tokens and API keys survive restarts and the CLI
and the server agree. Test and production refuse to start without a secret (settings).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from thallus.server.settings import MIN_SECRET_LENGTH, ServiceSettings
from thallus.server.storage.private import private_directory

SECRET_FILE = "secret_key"  # noqa: S105 - a file name


def server_secret(settings: ServiceSettings) -> bytes:
    if settings.secret_key is not None and settings.secret_key.get_secret_value():
        return settings.secret_key.get_secret_value().encode()
    if settings.env != "development":  # settings validation refuses this already
        raise RuntimeError("THALLUS_SECRET_KEY is required outside development")
    path = settings.data_dir / SECRET_FILE
    if not path.exists():
        _create_atomically(path, secrets.token_urlsafe(48).encode())
    secret = path.read_bytes().strip()
    if len(secret) < MIN_SECRET_LENGTH:
        raise RuntimeError(f"{path} is empty or too short; delete it to generate a new development secret")
    return secret


def _create_atomically(path: Path, content: bytes) -> None:
    """Write a temporary file, then link it into place: readers see the whole secret or no file."""
    private_directory(path.parent)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        with contextlib.suppress(FileExistsError):  # another process won the race; its secret stands
            os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@functools.lru_cache(maxsize=64)
def _derive(secret: bytes, purpose: str) -> bytes:
    """The key of one purpose under one secret; derived once (the API-key check runs per request)."""
    return hmac.digest(secret, b"thallus/" + purpose.encode(), "sha256")


@dataclass(frozen=True)
class KeyRing:
    """The current secret first, then earlier ones still accepted."""

    secrets: tuple[bytes, ...]

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> KeyRing:
        previous = tuple(s.get_secret_value().encode() for s in settings.previous_secret_keys if s.get_secret_value())
        return cls((server_secret(settings), *previous))

    def signing_key(self) -> tuple[str, bytes]:
        """``(kid, key)`` that signs new access tokens."""
        key = _derive(self.secrets[0], "access-token")
        return _kid(key), key

    def verification_keys(self) -> dict[str, bytes]:
        """Every key that may have signed a live access token, by ``kid``."""
        keys = (_derive(secret, "access-token") for secret in self.secrets)
        return {_kid(key): key for key in keys}

    def hash(self, purpose: str, value: str) -> str:
        """The keyed hash under the current secret (what new records store)."""
        return hmac.digest(_derive(self.secrets[0], purpose), value.encode(), "sha256").hex()

    def hashes(self, purpose: str, value: str) -> list[str]:
        """The keyed hash under every secret (what a lookup must try during rotation)."""
        encoded = value.encode()
        return [hmac.digest(_derive(secret, purpose), encoded, "sha256").hex() for secret in self.secrets]


def _kid(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:16]
