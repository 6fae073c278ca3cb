"""Password policy and Argon2id hashing (SYSTEM.md §9).

Policy: 12–128 characters with an upper-case letter, a lower-case letter, a digit and a special
character. Hashes are Argon2id (RFC 9106) with the configured cost; a hash made with other
parameters is re-made on the next successful login. Hashing runs in a worker thread — it takes
tens of milliseconds by design and must not stall the event loop.
"""

from __future__ import annotations

import unicodedata

import anyio.to_thread
from argon2 import PasswordHasher as Argon2Hasher
from argon2 import Type
from argon2.exceptions import InvalidHashError, VerificationError

MIN_LENGTH = 12
MAX_LENGTH = 128
POLICY = (
    f"{MIN_LENGTH}–{MAX_LENGTH} characters with an upper-case letter, a lower-case letter, "
    "a digit and a special character"
)


def password_problems(password: str) -> list[str]:
    """What ``password`` lacks under the policy; empty when it is acceptable.

    Classes are Unicode categories, so a symbol such as Ⓐ is a special character, not a letter.
    """
    problems = []
    if not MIN_LENGTH <= len(password) <= MAX_LENGTH:
        problems.append(f"length must be {MIN_LENGTH}–{MAX_LENGTH} characters")
    categories = {unicodedata.category(char) for char in password}
    if "Lu" not in categories:
        problems.append("needs an upper-case letter")
    if "Ll" not in categories:
        problems.append("needs a lower-case letter")
    if "Nd" not in categories:
        problems.append("needs a digit")
    if all(category[0] in "LN" for category in categories):  # neither a letter nor a number
        problems.append("needs a special character")
    return problems


class PasswordHasher:
    """Argon2id with fixed cost parameters; a dummy hash equalises timing for unknown accounts."""

    def __init__(self, *, time_cost: int, memory_cost: int, parallelism: int) -> None:
        self._argon2 = Argon2Hasher(time_cost=time_cost, memory_cost=memory_cost, parallelism=parallelism, type=Type.ID)
        self._dummy_hash = self._argon2.hash("thallus dummy password, never matches")

    async def hash(self, password: str) -> str:
        return await anyio.to_thread.run_sync(self._argon2.hash, password)

    async def verify(self, password_hash: str, password: str) -> bool:
        return await anyio.to_thread.run_sync(self._verify, password_hash, password)

    async def burn(self, password: str) -> None:
        """Spend the time a real verification takes (an unknown e-mail must not answer faster)."""
        await anyio.to_thread.run_sync(self._verify, self._dummy_hash, password)

    def needs_rehash(self, password_hash: str) -> bool:
        try:
            return self._argon2.check_needs_rehash(password_hash)
        except InvalidHashError:
            return True

    def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return self._argon2.verify(password_hash, password)
        except (VerificationError, InvalidHashError, ValueError):  # incl. a non-ASCII stored hash
            return False
