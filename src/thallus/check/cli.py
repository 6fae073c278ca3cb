"""``thallus check URL``: scan an API's security layers from outside (docs/check.md).

Exit statuses: 0 no FAIL; 1 at least one FAIL; 2 the target could not be scanned (refused
connection, timeout, TLS error, an answer that is not HTTP, a redirect) or a usage error, with one
line on stderr — also when the ``check`` extra (httpx, Rich) is missing. stdout carries only the
report; a progress bar is drawn on stderr while it is a terminal, never in a pipe.

This module imports neither httpx nor Rich at import time, so that their absence can be reported.
"""

from __future__ import annotations

import argparse
import io
import re
import secrets
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import cast

from thallus.check import scan
from thallus.check.model import ENVIRONMENTS, Environment, Probe, ScanError, Status, Target

CHECK_EXTRA = 'pip install "thallus[check]"'
EXIT_CLEAN, EXIT_FAIL, EXIT_UNSCANNABLE = 0, 1, 2
_ORIGIN = re.compile(r"(https?)://((?:\*\.)?[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?|\[[0-9a-f:.]+\])(:[1-9][0-9]{0,4})?")
_COOKIE_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_SAFE_TEXT = re.compile(r"[\x21-\x7e]*")


class UsageError(Exception):
    pass


def parser() -> argparse.ArgumentParser:
    arguments = argparse.ArgumentParser(
        prog="thallus check",
        description=(
            "Scan an HTTP API's security layers from outside: security headers, CORS, CSRF, the "
            "correlation ID, the error shape and cookies; a PASS/WARN/FAIL row per check and a grade. "
            f"Politeness: at most {scan.MAX_REQUESTS} requests ({scan.FIXED_REQUESTS}, 5 per --allowed-origin "
            "or 6 per pattern, up to 5 CSRF probes and 3 more with --allow-destructive), sent one at a time, "
            "only to URL's origin, each with --timeout; redirects are reported, never followed."
        ),
        epilog="Exit status: 0 no FAIL, 1 any FAIL, 2 the target could not be scanned. See docs/check.md.",
    )
    arguments.add_argument(
        "url", metavar="URL", help="an http(s) URL of the API that answers 2xx, e.g. https://api.example.com/health"
    )
    arguments.add_argument(
        "--allowed-origin",
        action="append",
        default=[],
        metavar="O",
        help="an origin in the API's CORS allowlist (scheme://host[:port] or https://*.name); repeatable, at most 10",
    )
    arguments.add_argument(
        "--cookie",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a cookie the API reads (e.g. a session) for the CSRF probes; repeatable",
    )
    arguments.add_argument(
        "--csrf-endpoint",
        metavar="PATH",
        help="a path taking POST with that cookie, whose success does little harm (e.g. /api/v1/auth/logout)",
    )
    arguments.add_argument(
        "--allow-destructive", action="store_true", help="also send PUT, PATCH and DELETE to --csrf-endpoint"
    )
    arguments.add_argument(
        "--api-key", metavar="K", help="sent as X-API-Key on the probes that act as a client ('-' reads it from stdin)"
    )
    arguments.add_argument(
        "--env",
        choices=ENVIRONMENTS,
        default="production",
        help="the profile the API should meet (default: production)",
    )
    arguments.add_argument(
        "--timeout", type=float, default=10.0, metavar="S", help="seconds to connect and for each read (default: 10)"
    )
    arguments.add_argument(
        "--json", action="store_true", help='print one JSON document: {"target", "grade", "results": [...]}'
    )
    return arguments


def target_from(options: argparse.Namespace) -> Target:
    scheme, host, port, path = _url(options.url)
    origins = tuple(dict.fromkeys(_origin(value) for value in options.allowed_origin))
    if len(origins) > scan.MAX_ALLOWED_ORIGINS:
        raise UsageError(f"--allowed-origin: at most {scan.MAX_ALLOWED_ORIGINS}, got {len(origins)}")
    cookies = tuple(_cookie(value) for value in options.cookie)
    endpoint = options.csrf_endpoint
    if endpoint is not None and (
        not endpoint.startswith("/") or endpoint.startswith("//") or not _SAFE_TEXT.fullmatch(endpoint)
    ):
        raise UsageError(f"--csrf-endpoint: {endpoint!r} is not a path on the target (it starts with one /)")
    if (endpoint is None) != (not cookies):
        raise UsageError("--cookie and --csrf-endpoint go together: the CSRF probes need both")
    if options.allow_destructive and endpoint is None:
        raise UsageError("--allow-destructive needs --csrf-endpoint and --cookie")
    if not 0 < options.timeout <= 300:
        raise UsageError("--timeout: seconds, more than 0 and at most 300")
    api_key = sys.stdin.readline().strip() if options.api_key == "-" else options.api_key
    if api_key is not None and not _SAFE_TEXT.fullmatch(api_key):
        raise UsageError("--api-key: visible ASCII only")
    return Target(
        scheme,
        host,
        port,
        path,
        env=cast(Environment, options.env),
        allowed_origins=origins,
        cookies=cookies,
        csrf_endpoint=endpoint,
        api_key=api_key or None,
        allow_destructive=options.allow_destructive,
        token=secrets.token_hex(5),
    )


def _url(text: str) -> tuple[str, str, int | None, str]:
    import httpx

    try:
        url = httpx.URL(text)
    except httpx.InvalidURL as exc:
        raise UsageError(f"URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise UsageError(f"URL: {text!r} is not an http:// or https:// URL with a host")
    if url.userinfo:
        raise UsageError("URL: no user:password@ — pass credentials with --api-key or --cookie")
    return url.scheme, url.raw_host.decode("ascii").lower(), url.port, url.raw_path.decode("ascii") or "/"


def _origin(text: str) -> str:
    value = text.strip().lower()
    if not _ORIGIN.fullmatch(value):
        raise UsageError(f"--allowed-origin: {text!r} is not scheme://host[:port] (or scheme://*.name)")
    return value


def _cookie(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not _COOKIE_NAME.fullmatch(name) or not _SAFE_TEXT.fullmatch(value) or ";" in value:
        raise UsageError("--cookie: NAME=VALUE, a cookie name and a value without ';', spaces or controls")
    return name, value


@contextmanager
def progress(total: int) -> Iterator[Callable[[Probe], None] | None]:
    """A transient progress bar on stderr, only when stderr is a terminal."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("probing", total=total)

        def advance(probe: Probe) -> None:
            bar.update(task, advance=1, description=f"probing {probe.title}")

        yield advance


def main(argv: Sequence[str]) -> int:
    try:
        import httpx  # noqa: F401
        import rich  # noqa: F401
    except ModuleNotFoundError as exc:
        print(
            f"thallus: 'thallus check' needs {exc.name}, which is not installed; install it with: {CHECK_EXTRA}",
            file=sys.stderr,
        )
        return EXIT_UNSCANNABLE
    try:
        options = parser().parse_args(list(argv))
    except SystemExit as exc:  # --help (0) or a usage error argparse has printed (2)
        return exc.code if isinstance(exc.code, int) else EXIT_UNSCANNABLE
    try:
        target = target_from(options)
    except UsageError as exc:
        print(f"thallus check: {exc}", file=sys.stderr)
        return EXIT_UNSCANNABLE
    return _scan(target, options.timeout, json_output=options.json)


def _scan(target: Target, timeout: float, *, json_output: bool) -> int:
    from rich.console import Console

    from thallus.check import report
    from thallus.check.probes import Prober

    planned = len(scan.plan(target))
    try:
        with progress(planned) as on_send, Prober(target, timeout=timeout, budget=planned, on_send=on_send) as prober:
            results = scan.run(target, prober.send)
    except ScanError as exc:
        print(f"thallus check: {exc}", file=sys.stderr)
        return EXIT_UNSCANNABLE
    except KeyboardInterrupt:
        print("thallus check: interrupted", file=sys.stderr)
        return EXIT_UNSCANNABLE
    if json_output:
        print(report.to_json(target, results))
    elif sys.stdout.isatty():
        report.render(Console(), target, results, prober.sent)
    else:  # a pipe or a file: no colour, rows kept on one line where they fit, no trailing blanks
        buffer = io.StringIO()
        report.render(Console(file=buffer, width=200), target, results, prober.sent)
        sys.stdout.write("".join(line.rstrip() + "\n" for line in buffer.getvalue().splitlines()))
    return EXIT_FAIL if any(result.status is Status.FAIL for result in results) else EXIT_CLEAN
