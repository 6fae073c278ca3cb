"""A real Redis for tests: ``THALLUS_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``).

Each test gets a key prefix of its own and its keys are deleted afterwards. When no server answers,
tests skip with the reason — except in CI, where they fail.
"""

from __future__ import annotations

import asyncio
import os
import secrets

import coredis

from tests.databases import unavailable

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def redis_url() -> str:
    return os.environ.get("THALLUS_TEST_REDIS_URL", DEFAULT_REDIS_URL)


async def _ping(url: str) -> None:
    client: coredis.Redis[bytes] = coredis.Redis.from_url(url, connect_timeout=2, stream_timeout=2)
    await client.ping()


def require_redis() -> str:
    url = redis_url()
    try:
        asyncio.run(_ping(url))
    except Exception as exc:
        unavailable(f"Redis at {url} is not reachable: {exc}")
    return url


def new_prefix() -> str:
    return f"thallus-test-{os.getpid()}-{secrets.token_hex(4)}"


async def _delete_prefix(url: str, prefix: str) -> int:
    client: coredis.Redis[bytes] = coredis.Redis.from_url(url, connect_timeout=2, stream_timeout=2)
    keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
    return await client.delete(tuple(keys)) if keys else 0


def delete_prefix(url: str, prefix: str) -> int:
    return asyncio.run(_delete_prefix(url, prefix))
