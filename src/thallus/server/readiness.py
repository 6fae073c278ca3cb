"""Readiness: whether this instance can serve, checked on ``GET /ready`` (docs/design.md §12).

``/health`` says the process answers (liveness: restart it if not); ``/ready`` says its
dependencies answer (readiness: route traffic to it or not). Each check has a short deadline, so a
load balancer's probe never waits on a dead database: the database answers ``SELECT 1``, and Redis
(when ``THALLUS_REDIS_URL`` is set) answers ``PING``. Checks run concurrently; each names itself
in the answer. A failed check is logged once per state change, not once per probe.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy import text

from thallus.server.storage.database import Database

logger = logging.getLogger("thallus.readiness")

#: Seconds each check may take: well under a probe's usual timeout (Kubernetes: 1 s by default).
CHECK_TIMEOUT = 0.8

Check = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Verdict:
    """Every check's outcome: ``{"database": "ok", "redis": "unreachable: TimeoutError"}``."""

    checks: dict[str, str]

    @property
    def ready(self) -> bool:
        return all(outcome == "ok" for outcome in self.checks.values())

    @property
    def failed(self) -> list[str]:
        return [name for name, outcome in self.checks.items() if outcome != "ok"]


class Readiness:
    """The checks of one instance; :meth:`check` runs them all at once."""

    def __init__(self, database: Database, redis_url: str | None = None, *, timeout: float = CHECK_TIMEOUT) -> None:
        self.timeout = timeout
        self.checks: dict[str, Check] = {"database": self._database(database)}
        if redis_url:
            self.checks["redis"] = self._redis(redis_url)
        self._failing: set[str] = set()

    async def check(self) -> Verdict:
        names = list(self.checks)
        outcomes = await asyncio.gather(*(self._run(self.checks[name]) for name in names))
        verdict = Verdict(dict(zip(names, outcomes, strict=True)))
        self._log_changes(verdict)
        return verdict

    async def _run(self, check: Check) -> str:
        started = time.monotonic()
        try:
            await asyncio.wait_for(check(), self.timeout)
        except TimeoutError:
            return f"no answer within {self.timeout:g} s"
        except Exception as exc:  # any failure of a dependency is "not ready", named by its type
            return f"unreachable: {type(exc).__name__}"
        logger.debug("readiness check answered in %.1f ms", (time.monotonic() - started) * 1000)
        return "ok"

    def _log_changes(self, verdict: Verdict) -> None:
        failing = set(verdict.failed)
        for name in sorted(failing - self._failing):
            logger.error("not ready: %s %s", name, verdict.checks[name])
        for name in sorted(self._failing - failing):
            logger.info("ready again: %s answers", name)
        self._failing = failing

    @staticmethod
    def _database(database: Database) -> Check:
        async def check() -> None:
            async with database.engine.connect() as connection:
                await connection.execute(text("SELECT 1"))

        return check

    def _redis(self, url: str) -> Check:
        import coredis

        client: coredis.Redis[bytes] = coredis.Redis.from_url(
            url, connect_timeout=self.timeout, stream_timeout=self.timeout
        )

        async def check() -> None:
            await client.ping()

        return check
