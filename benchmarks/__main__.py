"""Every figure of docs/performance.md in one run: ``python -m benchmarks`` (or ``./run bench``).

Parts, in order (``--parts`` chooses, ``--quick`` shortens every run, for a first look only):

* ``core``     — bench_core.py: protect() against the bare app and the peer stack, each layer
  alone, and the cost against the number of allowed origins and of request headers (in-process);
* ``identity`` — bench_identity.py: what an API key (warm cache), a Bearer token and a login cost
  in the full reference service (in-process);
* ``service``  — bench_service.py: the reference service under uvicorn on loopback, driven by
  ``wrk``: /health, an API-key GET and a Bearer GET with each limiter storage (memory, Redis) on
  each database (SQLite, PostgreSQL), a POST with the audit log off and on, rate limiting with the
  memory and the Redis storage, with ratios against a bare Starlette app and against the anchor (a
  plain FastAPI app with PyJWT and in-memory dicts) served the same way;
* ``login``    — bench_login.py: sign-in under load on one ``thallus serve``: logins per second with
  1, 4 and 16 clients, then a burst of 150 concurrent logins (statuses, peak RSS growth, and the
  latency of an API-key client meanwhile), three rounds;
* ``revocation`` — bench_revocation.py: how fast a revocation through one instance reaches another:
  100 revocations (sessions and API keys, alternating) with two ``thallus serve`` on PostgreSQL and
  with two workers on SQLite, p50/p99/max of the delay and the revoking instance's next request,
  two rounds;
* ``abuse``    — bench_abuse.py: oversized bodies (200 MiB, declared and chunked, one and four at
  once: statuses, time to the 413, the server's peak RSS) and slow sockets (500 slowloris heads,
  500 stalled bodies, 500 held past an answer, 60 s each: /health p50/p99/max meanwhile, how many
  sockets the server closed and how fast).

The rate limiter's breakdown (bench_ratelimit.py) and the audit log at a million records
(bench_audit.py) have their own commands; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the scripts import their helpers as top-level modules

import bench_abuse
import bench_core
import bench_identity
import bench_login
import bench_revocation
import bench_service
from common import progress

PARTS: dict[str, tuple[Callable[[Sequence[str] | None], None], list[str], list[str]]] = {
    # name: (entry point, default arguments, --quick arguments)
    "core": (bench_core.main, [], ["--seconds", "0.3", "--repeat", "3", "--warmup", "0.1"]),
    "identity": (bench_identity.main, [], ["--seconds", "0.3", "--rounds", "3", "--logins", "5"]),
    "service": (bench_service.main, [], ["--seconds", "3", "--warmup", "1"]),
    "login": (bench_login.main, [], ["--rounds", "1", "--seconds", "3"]),
    "revocation": (bench_revocation.main, [], ["--rounds", "1", "--revocations", "20"]),
    # --quick shortens the bounds too (header 3 s, body 4 s) so that 12 s still show them closing sockets
    "abuse": (
        bench_abuse.main,
        [],
        [
            *("--rounds", "1", "--seconds", "12", "--sockets", "100", "--baseline", "3"),
            *("--header-timeout", "3", "--body-timeout", "4"),
        ],
    ),
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--quick", action="store_true", help="short runs: noisier numbers, for a first look")
    options = parser.parse_args(argv)
    parts = options.parts.split(",")
    if unknown := set(parts) - set(PARTS):
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    for name in parts:
        entry, arguments, quick = PARTS[name]
        progress(f"== {name} ==")
        started = time.monotonic()
        print(f"\n## {name}\n", flush=True)
        entry(quick if options.quick else arguments)
        sys.stdout.flush()
        progress(f"== {name}: {time.monotonic() - started:.0f} s ==")


if __name__ == "__main__":
    main()
