"""What authentication costs: an API-key request (the hot path), a Bearer request, and a login.

In-process ASGI calls into the full reference service (``thallus.server.api.create_app``: every layer,
the identity service, the audit writer) on a temporary SQLite file, on one event loop:

* ``GET /health`` without a credential — the service's floor;
* ``GET /health`` with ``X-API-Key`` — the same plus key verification (a cache hit after the first);
* ``GET /health`` with ``Authorization: Bearer`` — the same plus JWT verification and the session
  check in the database (made on every request, so revocation is immediate everywhere);
* ``GET /api/v1/users/me`` with the key — a route that reads the user;
* ``POST /api/v1/auth/login`` — Argon2id verification at the configured cost (default: production's
  64 MiB, t=3, p=4) plus a session row.

Run: ``.venv/bin/python benchmarks/bench_identity.py [--seconds 1] [--rounds 5] [--logins 20] [--json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from thallus._asgi import Message
from thallus.server.api import Service, create_app
from thallus.server.settings import ServiceSettings

PASSWORD = "Correct-Horse-Battery-9!"


def settings(data_dir: Path) -> ServiceSettings:
    return ServiceSettings(
        env="test",
        secret_key="b" * 48,
        allowed_origins="https://app.example.com",
        public_origin="https://api.example.com",
        data_dir=data_dir,
        rate_limit="100000000/minute",
        rate_limit_auth="100000000/minute",
        lockout_threshold=1_000_000,
    )


class Client:
    """Just enough of an ASGI client: one request, its status and body."""

    def __init__(self, app: Service) -> None:
        self.app = app

    async def request(
        self, method: str, path: str, headers: Sequence[tuple[str, str]] = (), body: bytes = b""
    ) -> tuple[int, bytes]:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "https",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"api.example.com"), *((k.lower().encode(), v.encode()) for k, v in headers)],
            "client": ("127.0.0.1", 40000),
            "server": ("api.example.com", 443),
            "state": {},
        }
        status = 0
        chunks: list[bytes] = []

        async def receive() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, send)
        return status, b"".join(chunks)


async def lifespan(app: Service) -> tuple[asyncio.Task[None], asyncio.Queue[Message]]:
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    outbox: asyncio.Queue[Message] = asyncio.Queue()
    task = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, outbox.put)
    )
    await inbox.put({"type": "lifespan.startup"})
    started = await outbox.get()
    assert started["type"] == "lifespan.startup.complete", started
    return task, inbox


async def per_request_us(
    client: Client, method: str, path: str, headers: Sequence[tuple[str, str]], seconds: float
) -> float:
    status, body = await client.request(method, path, headers)
    assert status == 200, (path, status, body[:200])
    for _ in range(50):
        await client.request(method, path, headers)
    count = 0
    started = time.perf_counter_ns()
    deadline = started + int(seconds * 1e9)
    while time.perf_counter_ns() < deadline:
        for _ in range(20):
            await client.request(method, path, headers)
        count += 20
    return (time.perf_counter_ns() - started) / count / 1000


async def run(options: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="thallus-bench-") as directory:
        app = create_app(settings(Path(directory)))
        task, inbox = await lifespan(app)
        try:
            identity = app.identity
            await identity.create_user("bench@example.com", PASSWORD, "Bench", api_access=True)
            client = Client(app)
            login_body = json.dumps({"email": "bench@example.com", "password": PASSWORD}).encode()
            json_headers = [("content-type", "application/json"), ("sec-fetch-site", "same-origin")]
            status, body = await client.request("POST", "/api/v1/auth/login", json_headers, login_body)
            assert status == 200, body
            token = json.loads(body)["access_token"]
            status, body = await client.request(
                "POST", "/api/v1/api-keys", [*json_headers, ("authorization", f"Bearer {token}")], b'{"name": "bench"}'
            )
            assert status == 201, body
            key = json.loads(body)["key"]
            kinds: dict[str, tuple[str, list[tuple[str, str]]]] = {
                "GET /health": ("/health", []),
                "GET /health + X-API-Key": ("/health", [("x-api-key", key)]),
                "GET /health + Bearer": ("/health", [("authorization", f"Bearer {token}")]),
                "GET /api/v1/users/me + X-API-Key": ("/api/v1/users/me", [("x-api-key", key)]),
            }
            # interleaved rounds, so a busy spell of the machine hits every kind alike; medians
            runs: dict[str, list[float]] = {name: [] for name in kinds}
            for _ in range(options.rounds):
                for name, (path, headers) in kinds.items():
                    runs[name].append(await per_request_us(client, "GET", path, headers, options.seconds))
            rows = {name: statistics.median(values) for name, values in runs.items()}
            api_key_added = statistics.median(
                key_run - plain_run
                for key_run, plain_run in zip(runs["GET /health + X-API-Key"], runs["GET /health"], strict=True)
            )
            logins = []
            for _ in range(options.logins):
                started = time.perf_counter()
                status, _ = await client.request("POST", "/api/v1/auth/login", json_headers, login_body)
                logins.append((time.perf_counter() - started) * 1000)
                assert status == 200
        finally:
            await inbox.put({"type": "lifespan.shutdown"})
            await task
    s = app.identity.settings
    return {
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "argon2": {
            "time_cost": s.argon2_time_cost,
            "memory_kib": s.argon2_memory_cost,
            "parallelism": s.argon2_parallelism,
        },
        "requests_us": rows,
        "rounds": options.rounds,
        "added_us": {
            "api_key": api_key_added,
            "bearer": rows["GET /health + Bearer"] - rows["GET /health"],
        },
        "login_ms": {"median": statistics.median(logins), "min": min(logins), "max": max(logins), "runs": len(logins)},
    }


def render(document: dict[str, Any]) -> str:
    argon2 = document["argon2"]
    lines = [
        f"Python {document['python']}, {document['cpus']} CPUs; full reference service in-process, SQLite",
        f"Argon2id: t={argon2['time_cost']}, m={argon2['memory_kib']} KiB, p={argon2['parallelism']}",
        "",
        f"{'request':36} {'µs/request':>11}  (median of {document['rounds']} interleaved rounds)",
    ]
    lines += [f"{name:36} {value:11.1f}" for name, value in document["requests_us"].items()]
    added, login = document["added_us"], document["login_ms"]
    lines += [
        "",
        f"API-key verification adds {added['api_key']:.1f} µs (cache hit; median of the per-round differences); "
        f"a Bearer token adds {added['bearer']:.1f} µs (JWT + session row).",
        f"Login: median {login['median']:.1f} ms over {login['runs']} runs.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per request kind and round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are shown")
    parser.add_argument("--logins", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args(argv)
    for name in [name for name in os.environ if name.startswith("THALLUS_")]:
        del os.environ[name]
    import logging

    logging.disable(logging.WARNING)  # the access log would dominate the numbers
    document = asyncio.run(run(options))
    print(json.dumps(document, indent=2) if options.json else render(document))


if __name__ == "__main__":
    main()
