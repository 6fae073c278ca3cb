"""How fast a revocation reaches every instance: p50/p99/max over ``--revocations`` revocations, with
two ``thallus serve`` processes on one PostgreSQL database and one ``thallus serve --workers 2`` on
SQLite (docs/design.md §12: refused at once where revoked, within 1 s everywhere else).

Set-ups (production profile, a 48-character secret, cheap Argon2, limits nothing reaches; the same
settings as tests/test_revocation_served.py):

* ``postgresql`` — instances A and B, two processes on a database of the run's own on the server
  of ``THALLUS_TEST_DATABASE_URL`` (dropped at the end); B follows the change log every 250 ms and
  is woken by ``NOTIFY``;
* ``sqlite`` — one ``thallus serve --workers 2`` on one data directory; "A" and "B" are keep-alive
  connections pinned to each worker (which process holds a connection's server side is read from
  ``/proc``), and B's worker has only the 250 ms poll.

Each round, per set-up, ``--revocations`` times, alternating a session and an API key:

1. sign in through A (a new session), or create a key through A (with the round's session);
2. warm: ``GET /api/v1/users/me`` with it on B, then on A — 200 each, so its records are in both views;
3. revoke through A: ``POST /api/v1/auth/logout`` with the Bearer token, or ``DELETE
   /api/v1/api-keys/{id}``;
4. at once, in a thread of its own, A's very next request with it, which must be refused (the
   revoking instance applies its own change before it answers: a delay of zero requests; the time
   that request took is reported);
5. at the same time, poll B every ``--poll`` ms until it answers 401 (on the SQLite workers, over
   new connections, each answered by either worker — whichever it is is read from ``/proc`` — since
   a kept-alive connection to ``thallus serve --workers N`` waits ~40 ms per answer; see
   :class:`FreshProbe`; A's next request is then the first that worker A answers). The
   **propagation delay** runs from A's answer to the revocation (when the client knows it is done;
   the change committed just before) to B's first 401; B's last 200, if any, was sent at its lower
   bound.

Every round is printed with its p50/p90/p99/max, then all rounds pooled and the spread of each round's
p50 and p99. A figure, never an assertion: tests/test_revocation_served.py asserts the bound. Run
``.venv/bin/python benchmarks/bench_revocation.py --help``.
"""

from __future__ import annotations

import argparse
import math
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench_service import postgres_database
from common import ROOT, BenchmarkError, conclude, describe, environment, progress, text_table
from figures import percentile
from served import clean_environment, describe_source, source_of_thallus, thallus_cli

if str(ROOT) not in sys.path:  # the served helpers live with the test they serve
    sys.path.insert(0, str(ROOT))

from tests.server import running_server
from tests.test_revocation_served import SAME_ORIGIN, Endpoint, Log, bearer, pinned_pair, socket_owner
from tests.test_revocation_served import environment as served_environment

PACKAGES = ("thallus", "uvicorn", "starlette", "fastapi", "sqlalchemy", "asyncpg", "aiosqlite", "httpx")
SETUPS = ("postgresql", "sqlite")
KINDS = ("session", "api_key")
EMAIL = "bench-revocation@example.com"
PASSWORD = "Correct-Horse-Battery-9!"
ME = "/api/v1/users/me"


# -- the set-ups -----------------------------------------------------------------------------------


@dataclass
class Setup:
    name: str
    description: str
    a: Endpoint
    b: Endpoint
    env: dict[str, str]
    #: SQLite workers: the measured requests go over fresh connections (see :class:`FreshProbe`)
    fresh: FreshProbe | None = None


@dataclass
class FreshProbe:
    """``GET /api/v1/users/me`` over a new connection each time, answered by whichever worker
    accepts it, and which worker that was (read from ``/proc`` while the connection is still open).

    Why not the pinned keep-alive connections: ``thallus serve --workers N`` answers a kept-alive
    connection ~40 ms late whenever a response's head and body go out in separate writes (uvicorn
    binds the shared socket itself, with ``proto`` 0, so asyncio never sets ``TCP_NODELAY`` on the
    accepted connections, and Nagle holds the body until the client's delayed ACK); a new
    connection starts in quick-ACK mode and does not wait. Measured over pinned connections, every
    poll would cost ~45 ms and the delay would have that resolution."""

    port: int
    server_pid: int
    a_pid: int
    b_pid: int

    def ask(self, headers: Mapping[str, str]) -> tuple[int, int | None, float]:
        """(status, the worker's pid, when the answer was complete)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            lines = [f"GET {ME} HTTP/1.1", "Host: 127.0.0.1", *(f"{name}: {value}" for name, value in headers.items())]
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    raise BenchmarkError("the server closed a connection without an answer")
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = next(
                (
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")[1:]
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            while len(body) < length:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                body += chunk
            received = time.monotonic()
            owner = socket_owner(self.server_pid, self.port, sock.getsockname()[1])
        return status, owner, received


@contextmanager
def postgres_instances(stack: ExitStack) -> Iterator[Setup | str]:
    """A and B on one PostgreSQL database of the run's own; the reason instead when there is none."""
    with postgres_database("revocation") as (url, reason):
        if url is None:
            yield reason or "no PostgreSQL"
            return
        env = served_environment(database_url=url)
        with running_server(env) as first, running_server(env) as second:
            Log(first), Log(second)  # drained, so a chatty server never blocks on its pipe
            a, b = Endpoint("A", first.url), Endpoint("B", second.url)
            stack.callback(a.close)
            stack.callback(b.close)
            description = f"two thallus serve processes (pids {first.process.pid}, {second.process.pid}), one database"
            yield Setup("postgresql", description, a, b, env)


@contextmanager
def sqlite_workers(stack: ExitStack) -> Iterator[Setup | str]:
    """One ``thallus serve --workers 2``; A and B are connections pinned to one worker each."""
    with tempfile.TemporaryDirectory(prefix="thallus-bench-revocation-") as data_dir:
        env = served_environment(data_dir=Path(data_dir))
        with running_server(env, "--workers", "2") as server:
            Log(server)
            try:
                a, b = pinned_pair(server, stack)
            except AssertionError as exc:
                raise BenchmarkError(str(exc)) from None
            description = f"thallus serve --workers 2 (pid {server.process.pid}), one SQLite file"
            assert a.worker is not None
            assert b.worker is not None
            fresh = FreshProbe(server.port, server.process.pid, a.worker, b.worker)
            yield Setup("sqlite", description, a, b, env, fresh)


# -- one revocation --------------------------------------------------------------------------------


@dataclass
class Revocation:
    kind: str
    #: ms from A's answer to the revocation to B's first 401
    delay_ms: float
    #: ms from the same moment to the send time of B's last 200 (None: B's first answer was a 401)
    last_accepted_ms: float | None
    #: B's requests until the 401 (the 401 included)
    polls: int
    #: A's next request with the revoked credential was refused
    a_next_refused: bool
    #: how long that request took (ms)
    a_next_ms: float
    #: how long the revoking request took (ms)
    revoke_ms: float
    #: anything unexpected (a status that is neither 200 nor 401, no refusal within --timeout)
    problem: str | None = None


class Round:
    """One round on one set-up: a session for the key's creation, then ``count`` revocations."""

    def __init__(self, setup: Setup, options: argparse.Namespace) -> None:
        self.setup = setup
        self.options = options

    def login(self) -> str:
        response = self.setup.a.request(
            "POST", "/api/v1/auth/login", json={"email": EMAIL, "password": PASSWORD}, headers=SAME_ORIGIN
        )
        if response.status_code != 200:
            raise BenchmarkError(f"{self.setup.name}: login answered {response.status_code}: {response.text[:300]}")
        token: str = response.json()["access_token"]
        return token

    def revoke_one(self, kind: str, session: str) -> Revocation:
        a, b = self.setup.a, self.setup.b
        if kind == "session":
            token = self.login()
            credential = bearer(token)
            method, path, headers = "POST", "/api/v1/auth/logout", {**bearer(token), **SAME_ORIGIN}
            revoke_status = 204
        else:
            created = a.request(
                "POST", "/api/v1/api-keys", json={"name": "bench"}, headers={**bearer(session), **SAME_ORIGIN}
            )
            if created.status_code != 201:
                raise BenchmarkError(f"{self.setup.name}: key creation answered {created.status_code}")
            key = created.json()
            credential = {"X-API-Key": key["key"]}
            method, path, headers = "DELETE", f"/api/v1/api-keys/{key['id']}", {**bearer(session), **SAME_ORIGIN}
            revoke_status = 204
        for endpoint in (b, a):
            warm = endpoint.request("GET", ME, headers=credential)
            if warm.status_code != 200:
                raise BenchmarkError(f"{self.setup.name}: warming {endpoint.name} answered {warm.status_code}")
        started = time.monotonic()
        revoked = a.request(method, path, headers=headers)
        done = time.monotonic()
        if revoked.status_code != revoke_status:
            raise BenchmarkError(f"{self.setup.name}: {method} {path} answered {revoked.status_code}")
        if self.setup.fresh is not None:
            return self.follow_fresh(self.setup.fresh, kind, credential, started, done)
        # A's very next request and B's polls start together (so neither delays the other's first)
        a_next: dict[str, float] = {}

        def ask_a() -> None:
            a_next["status"] = a.request("GET", ME, headers=credential).status_code
            a_next["ms"] = (time.monotonic() - done) * 1000

        thread = threading.Thread(target=ask_a, name="a-next-request")
        thread.start()
        problem = None
        last_accepted = None
        polls = 0
        poll = self.options.poll / 1000
        while True:
            sent = time.monotonic()
            answer = b.request("GET", ME, headers=credential)
            received = time.monotonic()
            polls += 1
            if answer.status_code == 401:
                break
            if answer.status_code != 200:
                problem = f"B answered {answer.status_code}"
                break
            last_accepted = sent - done
            if received - done > self.options.timeout:
                problem = f"B still accepted after {self.options.timeout} s"
                break
            time.sleep(poll)
        thread.join(30)
        return Revocation(
            kind,
            (received - done) * 1000,
            last_accepted * 1000 if last_accepted is not None else None,
            polls,
            a_next.get("status") == 401,
            a_next.get("ms", math.nan),
            (done - started) * 1000,
            problem,
        )

    def follow_fresh(
        self, probe: FreshProbe, kind: str, credential: Mapping[str, str], started: float, done: float
    ) -> Revocation:
        """The workers' set-up: new connections, each answered by either worker, until worker B
        refuses; A's next request is the first that worker A answers (any 200 from A is a problem)."""
        problem = None
        last_accepted = None
        polls = 0
        a_status: int | None = None
        a_received = math.nan
        b_received = math.nan
        while True:
            sent = time.monotonic()
            status, owner, received = probe.ask(credential)
            if owner == probe.a_pid:
                if a_status is None:
                    a_status, a_received = status, received
                elif status != 401:
                    problem = f"A answered {status} after refusing"
            elif owner == probe.b_pid:
                polls += 1
                if status == 401:
                    b_received = received
                elif status == 200:
                    last_accepted = sent - done
                else:
                    problem = f"B answered {status}"
            else:
                problem = f"no worker found for a connection (owner {owner})"
            if problem is not None or (a_status is not None and not math.isnan(b_received)):
                break
            if received - done > self.options.timeout:
                problem = f"no refusal from B within {self.options.timeout} s"
                break
            time.sleep(self.options.poll / 1000)
        return Revocation(
            kind,
            (b_received - done) * 1000,
            last_accepted * 1000 if last_accepted is not None else None,
            polls,
            a_status == 401,
            (a_received - done) * 1000,
            (done - started) * 1000,
            problem,
        )

    def run(self, count: int) -> list[Revocation]:
        session = self.login()
        return [self.revoke_one(KINDS[number % len(KINDS)], session) for number in range(count)]


# -- figures ---------------------------------------------------------------------------------------


def figures(revocations: Sequence[Revocation]) -> dict[str, Any]:
    delays = [item.delay_ms for item in revocations if item.problem is None]
    lower = [item.last_accepted_ms for item in revocations if item.last_accepted_ms is not None]
    return {
        "revocations": len(revocations),
        "problems": [item.problem for item in revocations if item.problem],
        "p50_ms": percentile(delays, 0.50),
        "p90_ms": percentile(delays, 0.90),
        "p99_ms": percentile(delays, 0.99),
        "max_ms": max(delays, default=None),
        "over_1s": sum(1 for value in delays if value > 1000),
        "accepted_after_revocation": len(lower),
        "last_accepted_max_ms": max(lower, default=None),
        "polls_p50": percentile([float(item.polls) for item in revocations], 0.50),
        "a_next_refused": sum(1 for item in revocations if item.a_next_refused),
        "a_next_p50_ms": percentile([item.a_next_ms for item in revocations], 0.50),
        "revoke_p50_ms": percentile([item.revoke_ms for item in revocations], 0.50),
    }


def spread(values: Sequence[float | None]) -> dict[str, float | None]:
    present = [value for value in values if value is not None]
    if not present:
        return {"min": None, "median": None, "max": None, "relative": None}
    middle = statistics.median(present)
    return {
        "min": min(present),
        "median": middle,
        "max": max(present),
        "relative": (max(present) - min(present)) / middle if middle else None,
    }


# -- the run ---------------------------------------------------------------------------------------


def run(options: argparse.Namespace) -> dict[str, Any]:
    document: dict[str, Any] = {
        "benchmark": "thallus bench_revocation",
        "environment": environment(PACKAGES),
        "options": {
            "setups": options.setups,
            "rounds": options.rounds,
            "revocations": options.revocations,
            "poll_ms": options.poll,
            "timeout_s": options.timeout,
        },
        "setups": {},
        "skipped": {},
    }
    document["source"] = source_of_thallus(served_environment(), package_tree=True)
    makers = {"postgresql": postgres_instances, "sqlite": sqlite_workers}
    for name in options.setups:
        with ExitStack() as stack:
            progress(f"{name}: starting")
            setup = stack.enter_context(makers[name](stack))
            if isinstance(setup, str):
                progress(f"{name} left out: {setup}")
                document["skipped"][name] = setup
                continue
            cli_env = clean_environment(setup.env)
            thallus_cli(cli_env, "users", "create", "--email", EMAIL, "--password", "-", "--api-access", stdin=PASSWORD)
            rounds: list[dict[str, Any]] = []
            pooled: list[Revocation] = []
            for number in range(1, options.rounds + 1):
                started = time.monotonic()
                revocations = Round(setup, options).run(options.revocations)
                pooled += revocations
                summary = figures(revocations)
                by_kind = {kind: figures([item for item in revocations if item.kind == kind]) for kind in KINDS}
                rounds.append(
                    {
                        "round": number,
                        "seconds": time.monotonic() - started,
                        "all": summary,
                        "kinds": by_kind,
                        "revocations": [asdict(item) for item in revocations],
                    }
                )
                progress(
                    f"  {name} round {number}: p50 {_ms(summary['p50_ms'])} ms, p99 {_ms(summary['p99_ms'])} ms, "
                    f"max {_ms(summary['max_ms'])} ms; A refused the next request {summary['a_next_refused']}/"
                    f"{summary['revocations']} ({time.monotonic() - started:.0f} s)"
                )
            document["setups"][name] = {
                "description": setup.description,
                "a": setup.a.name,
                "b": setup.b.name,
                "rounds": rounds,
                "pooled": figures(pooled),
                "pooled_kinds": {kind: figures([item for item in pooled if item.kind == kind]) for kind in KINDS},
                "spread": {
                    key: spread([item["all"][key] for item in rounds]) for key in ("p50_ms", "p99_ms", "max_ms")
                },
            }
    return document


# -- the report ------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def render(document: Mapping[str, Any]) -> str:
    options = document["options"]
    lines = [
        *describe(document["environment"]),
        describe_source(document["source"]),
        f"{options['rounds']} round(s) of {options['revocations']} revocations per set-up (sessions and API keys "
        f"alternating), B polled every {options['poll_ms']} ms; delays in ms from A's answer to the revocation "
        "to B's first 401",
        "",
    ]
    header = (
        "set-up",
        "round",
        "revoked",
        "n",
        "B p50",
        "B p90",
        "B p99",
        "B max",
        "> 1 s",
        "B accepted after",
        "B polls p50",
        "A next refused",
        "A next ms p50",
        "revoke ms p50",
    )
    rows: list[tuple[str, ...]] = []
    for name, result in document["setups"].items():
        pooled = {"round": "all", "all": result["pooled"], "kinds": result["pooled_kinds"]}
        items: list[dict[str, Any]] = [*result["rounds"], pooled]
        for item in items:
            kinds: dict[str, dict[str, Any]] = item["kinds"]
            for label, data in [("both", item["all"]), *kinds.items()]:
                rows.append(
                    (
                        name,
                        str(item["round"]),
                        label,
                        str(data["revocations"]),
                        _ms(data["p50_ms"]),
                        _ms(data["p90_ms"]),
                        _ms(data["p99_ms"]),
                        _ms(data["max_ms"]),
                        str(data["over_1s"]),
                        f"{data['accepted_after_revocation']} (≤ {_ms(data['last_accepted_max_ms'])} ms)",
                        _ms(data["polls_p50"]),
                        f"{data['a_next_refused']}/{data['revocations']}",
                        _ms(data["a_next_p50_ms"]),
                        _ms(data["revoke_p50_ms"]),
                    )
                )
    lines += text_table(header, rows, align="lll" + "r" * (len(header) - 3))
    lines.append("")
    for name, result in document["setups"].items():
        lines.append(f"{name}: {result['description']}; A = {result['a']}, B = {result['b']}")
        for key, values in result["spread"].items():
            relative = values["relative"]
            lines.append(
                f"  spread of the rounds' {key.removesuffix('_ms')}: {_ms(values['min'])} – {_ms(values['median'])} – "
                f"{_ms(values['max'])} ms"
                + (f" ({relative * 100:.0f} % of the median)" if relative is not None else "")
            )
        problems = Counter(problem for item in result["rounds"] for problem in item["all"]["problems"])
        for problem, count in problems.items():
            lines.append(f"  PROBLEM ×{count}: {problem}")
    for name, reason in document["skipped"].items():
        lines.append(f"{name} left out: {reason}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated subset of {','.join(SETUPS)}")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per set-up (default 2)")
    parser.add_argument("--revocations", type=int, default=100, help="revocations per round (default 100)")
    parser.add_argument("--poll", type=float, default=5.0, help="ms between B's requests (default 5)")
    parser.add_argument("--timeout", type=float, default=5.0, help="s after which a revocation counts as failed")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write every raw figure to PATH as JSON")
    options = parser.parse_args(argv)
    setups = [name.strip() for name in options.setups.split(",") if name.strip()]
    if unknown := set(setups) - set(SETUPS):
        parser.error(f"unknown set-ups: {', '.join(sorted(unknown))}")
    options.setups = [name for name in SETUPS if name in setups]
    if not options.setups or options.rounds < 1 or options.revocations < 1 or options.poll < 0:
        parser.error("choose a set-up; --rounds and --revocations must be >= 1, --poll >= 0")
    return options


def main(argv: Sequence[str] | None = None) -> None:
    options = parse_args(argv)
    conclude(
        "bench_revocation",
        lambda: run(options),
        render,
        json_path=options.json,
        invalid=lambda document: any(result["pooled"]["problems"] for result in document["setups"].values()),
        stopped="servers stopped",
    )


if __name__ == "__main__":
    main()
