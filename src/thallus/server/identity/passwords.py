"""Password policy and Argon2id hashing (docs/design.md §9).

Policy: 12–128 characters with an upper-case letter, a lower-case letter, a digit and a special
character. Hashes are Argon2id (RFC 9106) with the configured cost; a hash made with other
parameters is re-made on the next successful login.

Hashing is bounded: each Argon2id operation holds its memory cost (64 MiB by default) for tens of
milliseconds of CPU, so unbounded, a burst of logins is a burst of gigabytes. Every hash and
verification runs on a pool of ``concurrency`` threads of its own (``THALLUS_PASSWORD_HASH_CONCURRENCY``,
default two per CPU); a request waits at most ``max_wait`` seconds for one
(``THALLUS_PASSWORD_HASH_MAX_WAIT``), then gets :class:`HashingUnavailableError` — a 503 with
``Retry-After``, never an unbounded queue. A slot is given back when its thread finishes, not when
the request gives up, so a client that disconnects cannot push the count past the cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
import unicodedata
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from argon2 import PasswordHasher as Argon2Hasher
from argon2 import Type
from argon2.exceptions import InvalidHashError, VerificationError

T = TypeVar("T")
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


def default_concurrency() -> int:
    """Two Argon2 operations per CPU: enough to keep every core busy, 8 × 64 MiB on a 4-CPU host."""
    return 2 * (os.cpu_count() or 1)


#: How much lower than the request loop the hashing threads run (``nice`` steps; 19 is the lowest).
HASHING_NICENESS = 10


def _yield_to_requests() -> None:
    """Run this hashing thread (and the lane threads Argon2 starts from it, which inherit it) at a
    lower CPU priority than the event loop, so a burst of sign-ins takes the CPU the requests that
    hash nothing leave over, instead of starving them. Linux keeps the nice value per thread
    (setpriority(2)); elsewhere this is a no-op."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            current = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, current + HASHING_NICENESS))


class HashingUnavailableError(Exception):
    """No hashing slot freed up within the wait: the service is saturated (answer 503)."""


class HashingSlots:
    """At most ``concurrency`` operations at once on threads of their own; a bounded wait for one."""

    def __init__(self, concurrency: int, max_wait: float) -> None:
        if concurrency < 1 or max_wait <= 0:
            raise ValueError("concurrency must be at least 1 and max_wait positive")
        self.concurrency = concurrency
        self.max_wait = max_wait
        self.waiting = 0  # requests queued for a slot right now
        self._executor = ThreadPoolExecutor(
            max_workers=concurrency, thread_name_prefix="argon2", initializer=_yield_to_requests
        )
        # a semaphore belongs to one event loop; the CLI runs one loop per command, tests several
        self._semaphores: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}

    def _semaphore(self, loop: asyncio.AbstractEventLoop) -> asyncio.Semaphore:
        semaphore = self._semaphores.get(loop)
        if semaphore is None:
            for stale in [other for other in self._semaphores if other.is_closed()]:
                del self._semaphores[stale]
            semaphore = self._semaphores[loop] = asyncio.Semaphore(self.concurrency)
        return semaphore

    async def run(self, function: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        semaphore = self._semaphore(loop)
        self.waiting += 1
        try:
            async with asyncio.timeout(self.max_wait):
                await semaphore.acquire()
        except TimeoutError:
            raise HashingUnavailableError(f"no password-hashing slot within {self.max_wait:g} s") from None
        finally:
            self.waiting -= 1
        future = loop.run_in_executor(self._executor, function, *args)
        future.add_done_callback(lambda _: semaphore.release())
        return await asyncio.shield(future)


class PasswordHasher:
    """Argon2id with fixed cost parameters on bounded slots; a dummy hash equalises timing for
    unknown accounts."""

    def __init__(
        self,
        *,
        time_cost: int,
        memory_cost: int,
        parallelism: int,
        concurrency: int | None = None,
        max_wait: float = 5.0,
    ) -> None:
        self._argon2 = Argon2Hasher(time_cost=time_cost, memory_cost=memory_cost, parallelism=parallelism, type=Type.ID)
        self._dummy_hash = self._argon2.hash("thallus dummy password, never matches")
        self.slots = HashingSlots(concurrency or default_concurrency(), max_wait)

    async def hash(self, password: str) -> str:
        return await self.slots.run(self._argon2.hash, password)

    async def verify(self, password_hash: str, password: str) -> bool:
        return await self.slots.run(self._verify, password_hash, password)

    async def burn(self, password: str) -> None:
        """Spend the time a real verification takes (an unknown e-mail must not answer faster)."""
        await self.slots.run(self._verify, self._dummy_hash, password)

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
