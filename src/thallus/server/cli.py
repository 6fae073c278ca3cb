"""The ``thallus`` command: ``serve``, ``config show``, ``db upgrade``, ``users``, ``keys``, ``audit``.

Exit statuses: 0 done; 1 a refused or failed operation (duplicate e-mail, weak password, unknown
user, unreachable database, an audit chain that does not verify), with ``thallus: reason`` on stderr;
2 a usage error, nothing attempted: a malformed argument (a date that is not ISO 8601, a
non-positive number of days, an unknown format) is named by argparse on stderr, and invalid
settings print one line per problem (``thallus: THALLUS_VARIABLE: reason``).

Every failure goes to stderr; stdout carries only results (an export, a key, a summary), so they
can be piped. The read commands take ``--json`` (``users list``, ``audit verify``, ``config show``).
``audit verify``, ``audit export`` and ``audit prune`` show a progress bar (Rich) on stderr while
it is an interactive terminal, and print nothing extra — no escape codes — when it is a pipe or a
CI log (``export`` also stays quiet when its records go to that same terminal).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from thallus import __version__
from thallus.cors import CORSMiddleware
from thallus.errors import NotFoundError
from thallus.headers import CACHE_CONTROL, HeaderPolicy
from thallus.server.identity.passwords import default_concurrency
from thallus.server.identity.service import Identity, utc
from thallus.server.settings import ServiceSettings
from thallus.settings import ConfigurationError

if TYPE_CHECKING:
    from rich.progress import Progress as RichProgress
    from rich.progress import TaskID

    from thallus.server.audit.store import AuditFilter, AuditStore, Verification
    from thallus.server.storage.models import ApiKey, User

T = TypeVar("T")
EXIT_FAILURE = 1
EXIT_CONFIGURATION = 2

_DISPLAY_NAMES = {
    "x-content-type-options": "X-Content-Type-Options",
    "x-frame-options": "X-Frame-Options",
    "x-xss-protection": "X-XSS-Protection",
    "referrer-policy": "Referrer-Policy",
    "strict-transport-security": "Strict-Transport-Security",
    "permissions-policy": "Permissions-Policy",
    "content-security-policy": "Content-Security-Policy",
    "content-security-policy-report-only": "Content-Security-Policy-Report-Only",
    "reporting-endpoints": "Reporting-Endpoints",
    "cross-origin-opener-policy": "Cross-Origin-Opener-Policy",
    "cross-origin-resource-policy": "Cross-Origin-Resource-Policy",
    "cross-origin-embedder-policy": "Cross-Origin-Embedder-Policy",
    "x-permitted-cross-domain-policies": "X-Permitted-Cross-Domain-Policies",
    "cache-control": "Cache-Control",
}


async def _never_called(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover
    raise AssertionError("config show only reads the CORS layer's lists")


def effective_policy(settings: ServiceSettings) -> dict[str, Any]:
    """Everything a client will observe under ``settings``, as plain data."""
    policy = HeaderPolicy.from_settings(settings)
    cookie = settings.cookie_policy
    headers = {
        _DISPLAY_NAMES.get(name.decode(), name.decode()): value.decode("latin-1") for name, value in policy.headers
    }
    no_store_on = ["every error response (status >= 400)", *(f"paths under {path}" for path in settings.no_store_paths)]
    cors = CORSMiddleware.from_settings(_never_called, settings)  # its lists as checked at start-up
    return {
        "environment": settings.env,
        "public_origin": settings.public_origin,
        "headers": headers,
        "headers_removed": ["Server", "X-Powered-By"],
        "cache_control": {_DISPLAY_NAMES[CACHE_CONTROL.decode()]: "no-store", "on": no_store_on},
        "cors": {
            "allowed_origins": list(settings.origins),
            "allow_credentials": True,
            "allowed_methods": list(cors.allow_methods),
            "allowed_headers": list(cors.allowed_headers),
            "exposed_headers": list(cors.expose_headers),
            "max_age": settings.cors_max_age,
        },
        "cookies": {
            "secure": cookie.secure,
            "http_only": cookie.http_only,
            "name": cookie.name,
            "same_site": cookie.same_site,
            "path": cookie.path,
        },
        "csrf": {
            "mode": "strict" if settings.csrf_requires_origin_evidence else "lenient",
            "checked": "POST, PUT, PATCH, DELETE and every other non-GET/HEAD/OPTIONS method, with cookies, "
            "unless authenticated by a valid API key",
            "trusted_origins": list(settings.trusted_origins),
            "without_origin_evidence": "403" if settings.csrf_requires_origin_evidence else "allowed",
            "exempt_paths": list(settings.csrf_exempt_paths),
        },
        "correlation_header": settings.correlation_header,
        "metrics": {"endpoint": "/metrics", "access": settings.metrics_access},
        "errors": {"500_details": "exception type and message" if settings.expose_error_details else "generic"},
        "rate_limits": {
            "enabled": settings.rate_limit_enabled,
            "general": settings.rate_limit,
            "auth": settings.rate_limit_auth,
            "auth_paths": list(settings.rate_limit_auth_paths),
            "exempt_paths": list(settings.rate_limit_exempt_paths),
            "backend": _safe_url(settings.redis_url) if settings.redis_url else "memory (this process only)",
            "trusted_proxies": list(settings.trusted_proxies),
            "proxy_header": settings.proxy_header,
            "client_networks": {"ipv4": settings.rate_limit_ipv4_prefix, "ipv6": settings.rate_limit_ipv6_prefix},
            "lockout_threshold": settings.lockout_threshold,
            "lockout_steps": list(settings.lockout_steps),
        },
        "bodies": {
            "max_body_bytes": settings.max_body_bytes,
            "route_max_body_bytes": dict(settings.route_max_body_bytes),
            "body_timeout": settings.body_timeout,
            "body_min_rate": settings.body_min_rate,
        },
        "connections": {
            "header_timeout": settings.header_timeout,
            "keep_alive_timeout": settings.keep_alive_timeout,
            "max_connections_per_worker": settings.max_connections,
            "max_connections_per_client": settings.max_connections_per_client,
        },
        "password_hashing": {
            "algorithm": "argon2id",
            "memory_kib": settings.argon2_memory_cost,
            "time_cost": settings.argon2_time_cost,
            "parallelism": settings.argon2_parallelism,
            "concurrency": settings.password_hash_concurrency or default_concurrency(),
            "max_wait": settings.password_hash_max_wait,
        },
        "audit": {
            "persistent": settings.audit_enabled,
            "database": _safe_url(settings.effective_database_url),
            "journal": str(settings.effective_audit_journal_dir),
            "queue_size": settings.audit_queue_size,
            "batch_size": settings.audit_batch_size,
            "write_timeout": settings.audit_write_timeout,
        },
    }


def _print_policy(policy: dict[str, Any]) -> None:
    lines = [f"Environment: {policy['environment']}", f"Public origin: {policy['public_origin'] or '(not set)'}", ""]
    lines.append("Security headers (every response):")
    lines += [f"  {name}: {value}" for name, value in policy["headers"].items()]
    lines.append(f"  Removed: {', '.join(policy['headers_removed'])}")
    lines.append(f"  Cache-Control: no-store on {'; '.join(policy['cache_control']['on'])}")
    cors = policy["cors"]
    lines += [
        "",
        "CORS:",
        f"  Allowed origins: {', '.join(cors['allowed_origins']) or '(none)'}",
        f"  Allow credentials: {'true' if cors['allow_credentials'] else 'false'}",
        f"  Allowed methods: {', '.join(cors['allowed_methods'])}",
        f"  Allowed headers: {', '.join(cors['allowed_headers'])}",
        f"  Exposed headers: {', '.join(cors['exposed_headers'])}",
        f"  Preflight max age: {cors['max_age']} s",
    ]
    cookie = policy["cookies"]
    attributes = ["Secure"] if cookie["secure"] else []
    attributes += ["HttpOnly"] if cookie["http_only"] else []
    attributes += [f"SameSite={cookie['same_site']}", f"Path={cookie['path']}"]
    lines += ["", f"Session cookie: {cookie['name']}", f"  {'; '.join(attributes)}"]
    csrf = policy["csrf"]
    lines += [
        "",
        f"CSRF: {csrf['mode']}",
        f"  Checked: {csrf['checked']}",
        f"  Trusted origins: {', '.join(csrf['trusted_origins']) or '(none)'}",
        f"  No Sec-Fetch-Site, Origin or Referer: {csrf['without_origin_evidence']}",
        "",
        f"Errors: 500 responses show {policy['errors']['500_details']}",
    ]
    limits = policy["rate_limits"]
    lines += [
        "",
        f"Rate limits: {'on' if limits['enabled'] else 'off'} (per client IP, backend: {limits['backend']})",
        f"  General: {limits['general']}; auth endpoints ({', '.join(limits['auth_paths'])}): {limits['auth']}",
        f"  Exempt: {', '.join(limits['exempt_paths']) or '(none)'}",
        f"  Trusted proxies: {', '.join(limits['trusted_proxies']) or '(none: the peer address is the client)'}"
        + (f" (their {limits['proxy_header']} header)" if limits["trusted_proxies"] else ""),
        f"  Clients counted per IPv4 /{limits['client_networks']['ipv4']}, IPv6 /{limits['client_networks']['ipv6']}",
        f"  Login lockout: after {limits['lockout_threshold']} failures, for "
        + ", ".join(f"{step} s" for step in limits["lockout_steps"])
        + " (the last repeating)",
    ]
    bodies, connections = policy["bodies"], policy["connections"]
    routes = ", ".join(f"{path} {size}" for path, size in bodies["route_max_body_bytes"].items())
    lines += [
        "",
        f"Request bodies: at most {bodies['max_body_bytes']} bytes"
        + (f" ({routes})" if routes else "")
        + f"; 408 after a {bodies['body_timeout']:g} s pause"
        + (f" or, after that long, below {bodies['body_min_rate']} B/s" if bodies["body_min_rate"] else ""),
        f"Connections (thallus serve): headers within {connections['header_timeout']:g} s, idle "
        f"{connections['keep_alive_timeout']} s, at most {connections['max_connections_per_worker']} per worker"
        + (
            f" and {connections['max_connections_per_client']} per client"
            if connections["max_connections_per_client"]
            else ""
        ),
    ]
    hashing = policy["password_hashing"]
    lines += [
        "",
        f"Password hashing: Argon2id, {hashing['memory_kib']} KiB, t={hashing['time_cost']}, "
        f"p={hashing['parallelism']}; at most {hashing['concurrency']} at once, "
        f"503 after waiting {hashing['max_wait']:g} s",
    ]
    audit = policy["audit"]
    lines += [
        "",
        f"Audit log: {'persistent, hash-chained' if audit['persistent'] else 'log lines only'} ({audit['database']})",
        f"  Spill journal: {audit['journal']}; queue {audit['queue_size']}, batches of {audit['batch_size']}, "
        f"spill after {audit['write_timeout']} s",
    ]
    print("\n".join(lines))


def _load_settings() -> ServiceSettings:
    try:
        return ServiceSettings.load()
    except ConfigurationError as exc:
        for problem in exc.problems:
            print(f"thallus: {problem}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIGURATION) from None


def _config_show(args: argparse.Namespace) -> int:
    policy = effective_policy(_load_settings())
    if args.json:
        print(json.dumps(policy, indent=2))
    else:
        _print_policy(policy)
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from thallus.server.connections import PROTOCOL
    from thallus.server.storage import Database

    settings = _load_settings()  # fail fast, before uvicorn starts workers
    if args.workers > 1 and not settings.redis_url:
        print(
            f"thallus: warning: without THALLUS_REDIS_URL each of the {args.workers} workers keeps its own rate "
            f"limits and login lockout, so a client gets {args.workers}× the limits and an attacker "
            f"{args.workers}× the password guesses between two locks; set THALLUS_REDIS_URL to share them",
            file=sys.stderr,
        )
    _run(Database(settings.effective_database_url).migrate())  # once, before any worker
    uvicorn.run(
        "thallus.server.service:serve_factory",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_config=None,
        log_level=settings.log_level.lower(),
        access_log=False,
        server_header=False,
        proxy_headers=False,
        http=PROTOCOL,  # uvicorn's h11 protocol with a header deadline and a connection cap
        # the standard event loop whatever is installed: the protocol above wraps asyncio's
        # transports (lingering close, TCP_NODELAY), and uvloop's are other classes; with
        # uvicorn[standard] (or fastapi[standard]) installed, uvicorn's "auto" would pick uvloop
        loop="asyncio",
        timeout_keep_alive=settings.keep_alive_timeout,
    )
    return 0


def _run(operation: Coroutine[Any, Any, T]) -> T:
    """Run one async operation; identity and database errors become one ``thallus:`` line and exit 1."""
    from thallus.errors import ThallusError
    from thallus.server.storage import DatabaseUnavailableError

    try:
        return asyncio.run(operation)
    except ThallusError as exc:
        print(f"thallus: {exc.message}", file=sys.stderr)
        if isinstance(exc.details, list):
            for item in exc.details:
                if isinstance(item, dict) and "msg" in item:
                    print(f"thallus:   {item.get('loc', ['?'])[-1]}: {item['msg']}", file=sys.stderr)
        raise SystemExit(EXIT_FAILURE) from None
    except DatabaseUnavailableError as exc:
        print(f"thallus: the database is unavailable: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_FAILURE) from None


async def _with_identity(settings: ServiceSettings, work: Callable[[Identity], Awaitable[T]]) -> T:
    """Run ``work`` with the identity service; what it audits lands in the persistent audit log."""
    from thallus.server.api import audit_writer
    from thallus.server.storage import Database

    database = Database(settings.effective_database_url)
    writer = audit_writer(settings, database) if settings.audit_enabled else None
    identity = Identity.from_settings(settings, writer, database=database)
    try:
        await database.migrate()
        if writer is not None:
            await writer.start()
        return await work(identity)
    finally:
        if writer is not None:
            await writer.stop()
        await database.dispose()


def _read_password(value: str) -> str:
    """``-`` reads the password from standard input (keeps it out of the process list)."""
    return sys.stdin.readline().rstrip("\n") if value == "-" else value


def _db_upgrade(args: argparse.Namespace) -> int:
    from thallus.server.storage import Database

    settings = _load_settings()
    _run(Database(settings.effective_database_url).migrate())
    print(f"database is at the newest schema: {_safe_url(settings.effective_database_url)}")
    return 0


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _users_create(args: argparse.Namespace) -> int:
    settings = _load_settings()
    password = _read_password(args.password)
    role = "admin" if args.admin else "user"

    async def work(identity: Identity) -> User:
        return await identity.create_user(args.email, password, args.name, role=role, api_access=args.api_access)

    user = _run(_with_identity(settings, work))
    print(f"{user.id} {user.email} created ({role}{', api_access' if user.api_access else ''})")
    return 0


def _users_list(args: argparse.Namespace) -> int:
    settings = _load_settings()
    users = _run(_with_identity(settings, lambda identity: identity.list_users()))
    if args.json:
        documents = [
            {
                "id": user.id,
                "email": user.email,
                "name": user.name,
                "role": user.role,
                "features": user.features,
                "is_active": user.is_active,
                "created_at": user.created_at.isoformat(),
            }
            for user in users
        ]
        print(json.dumps(documents, indent=2))
        return 0
    for user in users:
        features = ",".join(user.features) or "-"
        print(f"{user.id} {user.email} {user.role} {features} {user.created_at.isoformat()} {user.name or '-'}")
    return 0


def _users_set(args: argparse.Namespace) -> int:
    from thallus.server.identity.service import ClientInfo

    if args.role is None and args.api_access is None and args.active is None:
        args.usage_error("nothing to change: give --role, --api-access/--no-api-access or --active/--no-active")
    settings = _load_settings()

    async def work(identity: Identity) -> User:
        user = await identity.user_by_email(args.email)
        if user is None:
            raise NotFoundError(f"No user with e-mail address {args.email}.")
        return await identity.update_user(
            user.id,
            ClientInfo(user_agent="thallus-cli"),
            role=args.role,
            api_access=args.api_access,
            is_active=args.active,
            actor="cli",
        )

    user = _run(_with_identity(settings, work))
    state = "active" if user.is_active else "inactive"
    print(f"{user.id} {user.email} {user.role} {','.join(user.features) or '-'} {state}")
    return 0


def _users_unlock(args: argparse.Namespace) -> int:
    from thallus.server.api import login_lockout
    from thallus.server.identity.service import ClientInfo

    settings = _load_settings()
    if not settings.redis_url:
        print(
            "thallus: lockouts live in the memory of the serving process when THALLUS_REDIS_URL is not set; "
            "use POST /api/v1/admin/users/{id}/unlock instead",
            file=sys.stderr,
        )
        return EXIT_FAILURE

    async def work(identity: Identity) -> tuple[str, bool]:
        user = await identity.user_by_email(args.email)
        if user is None:
            raise NotFoundError(f"No user with e-mail address {args.email}.")
        identity.lockout = login_lockout(settings)
        return user.id, await identity.unlock(user.id, ClientInfo(user_agent="thallus-cli"), actor="cli")

    user_id, was_locked = _run(_with_identity(settings, work))
    print(f"{user_id} {args.email} unlocked" + ("" if was_locked else " (it was not locked)"))
    return 0


def _keys_create(args: argparse.Namespace) -> int:
    from thallus.principal import Principal
    from thallus.server.identity.service import ClientInfo

    settings = _load_settings()
    expires_at: datetime | None = args.expires_at

    async def work(identity: Identity) -> tuple[ApiKey, str]:
        user = await identity.user_by_email(args.email)
        if user is None:
            raise NotFoundError(f"No user with e-mail address {args.email}.")
        principal = Principal(user.id, user.email, user.name, user.role, "session")
        client = ClientInfo(user_agent="thallus-cli")
        return await identity.create_api_key(principal, args.name, expires_at, client, require_feature=False)

    key, raw = _run(_with_identity(settings, work))
    print(f"created API key {key.id} ({key.preview}) for {args.email}; it is shown once:", file=sys.stderr)
    print(raw)
    return 0


#: The most records a progress bar's count lags behind: it is updated once per this many (cheap).
PROGRESS_STEP = 500


class _Progress:
    """A progress bar (Rich) on stderr while stderr is an interactive terminal; nothing at all otherwise.

    For a pipe or a CI log nothing is imported, counted or printed — no escape codes, no extra
    line, even when ``FORCE_COLOR`` is set — so ``active`` tells the caller whether counting the
    work ahead (a ``COUNT`` query) is worth it. ``TERM=dumb`` and ``TTY_COMPATIBLE=0`` turn it off.
    """

    def __init__(self, description: str, *, enabled: bool = True) -> None:
        self._description = description
        self._enabled = enabled
        self._bar: RichProgress | None = None
        self._task: TaskID | None = None
        self.done = 0
        self._shown = 0

    @property
    def active(self) -> bool:
        return self._bar is not None

    def __enter__(self) -> _Progress:
        if not (self._enabled and sys.stderr.isatty()):
            return self
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeRemainingColumn,
        )

        console = Console(stderr=True)
        if not console.is_interactive:
            return self
        self._bar = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(elapsed_when_finished=True),
            console=console,
            redirect_stdout=False,  # stdout carries the results (an export): never touched
        )
        self._task = self._bar.add_task(self._description, total=None)
        self._bar.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._flush()
            self._bar.stop()
            self._bar = None

    def expect(self, total: int) -> None:
        """How many records the work will take (the bar pulses until this is known)."""
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, total=total)

    def advance(self, count: int = 1) -> None:
        self.done += count
        if self.done - self._shown >= PROGRESS_STEP:
            self._flush()

    def finish(self, done: int | None = None, *, complete: bool = True) -> None:
        """The work ended after ``done`` records: all there were (``complete``), or where it stopped."""
        if done is not None:
            self.done = done
        if self._bar is not None and self._task is not None and complete:
            self._bar.update(self._task, total=self.done)
        self._flush()

    def _flush(self) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=self.done)
        self._shown = self.done


@contextmanager
def _counting_records(progress: _Progress) -> Iterator[None]:
    """Advance ``progress`` by one for each audit record loaded from the database meanwhile.

    ``AuditStore.verify`` takes no callback and ``export_lines`` yields bytes, but both load the
    records as :class:`AuditLog` rows, a page at a time: the bar counts those (at most one page
    ahead of the work). One process, one command: the listener is removed on the way out.
    """
    if not progress.active:
        yield
        return
    from sqlalchemy import event

    from thallus.server.storage.models import AuditLog

    def loaded(target: AuditLog, context: object) -> None:
        progress.advance()

    event.listen(AuditLog, "load", loaded)
    try:
        yield
    finally:
        event.remove(AuditLog, "load", loaded)


async def _with_audit_store(settings: ServiceSettings, work: Callable[[AuditStore], Awaitable[T]]) -> T:
    from thallus.server.audit.store import AuditStore
    from thallus.server.storage import Database

    database = Database(settings.effective_database_url)
    try:
        await database.migrate()
        return await work(AuditStore(database))
    finally:
        await database.dispose()


async def _count_matching(store: AuditStore, query: AuditFilter) -> int:
    from sqlalchemy import func, select

    from thallus.server.storage.models import AuditLog

    async with store.database.session() as db:
        return int(await db.scalar(query.apply(select(func.count()).select_from(AuditLog))) or 0)


def _audit_verify(args: argparse.Namespace) -> int:
    settings = _load_settings()

    async def work(store: AuditStore) -> Verification:
        if progress.active:
            progress.expect(await store.count())  # every stored record follows the last checkpoint
        with _counting_records(progress):
            return await store.verify()

    with _Progress("Verifying the audit chain") as progress:
        result = _run(_with_audit_store(settings, work))
        progress.finish(result.checked, complete=result.ok)
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    elif result.ok:
        print(f"audit chain intact: {result.checked} records")
    if result.ok:
        return 0
    row = f"seq {result.broken_seq}" + (f" (id {result.broken_id})" if result.broken_id else "")
    print(
        f"thallus: audit chain broken at {row}: {result.reason}; {result.checked} records before it are intact",
        file=sys.stderr,
    )
    return EXIT_FAILURE


def _audit_export(args: argparse.Namespace) -> int:
    from thallus.server.api.routes.audit_logs import export_lines
    from thallus.server.audit.store import AuditFilter

    if args.start_date and args.end_date and args.end_date < args.start_date:
        args.usage_error("--end-date is before --start-date")
    settings = _load_settings()
    query = AuditFilter(
        user_id=args.user_id,
        actions=tuple(args.action or ()),
        outcome=args.outcome,
        start=args.start_date,
        end=args.end_date,
    )
    try:
        output = open(args.output, "wb") if args.output else sys.stdout.buffer  # noqa: SIM115 - closed below
    except OSError as exc:
        print(f"thallus: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE

    async def work(store: AuditStore) -> None:
        if progress.active:
            progress.expect(await _count_matching(store, query))
        with _counting_records(progress):
            async for chunk in export_lines(store, query, args.format):
                output.write(chunk)
        output.flush()

    # records scrolling by on the terminal are progress enough, and a bar would tear through them
    to_terminal = not args.output and sys.stdout.isatty()
    try:
        with _Progress("Exporting audit records", enabled=not to_terminal) as progress:
            _run(_with_audit_store(settings, work))
            progress.finish()
    except BrokenPipeError:
        # the reader stopped early (``| head``): end quietly, as other tools do, without a
        # second error when Python flushes stdout on the way out
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    finally:
        if args.output:
            output.close()
    return 0


@dataclass(frozen=True)
class _PrunePlan:
    """What ``AuditStore.prune(cutoff)`` would do: delete ``count`` records, the last of them ``seq``
    (``hash``), which becomes the new checkpoint."""

    count: int
    seq: int | None = None
    hash: str | None = None


async def _prune_plan(store: AuditStore, cutoff: datetime) -> _PrunePlan:
    """``AuditStore.prune``'s own queries, read only: the prefix of the chain before the first
    record created at or after ``cutoff`` (every record when none is)."""
    from sqlalchemy import func, select

    from thallus.server.storage.models import AuditChainHead, AuditLog

    async with store.database.session() as db:
        first_kept = await db.scalar(select(func.min(AuditLog.seq)).where(AuditLog.created_at >= cutoff))
        if first_kept is None:
            first_kept = int(await db.scalar(select(AuditChainHead.seq).where(AuditChainHead.id == 1)) or 0) + 1
        last_pruned = await db.scalar(
            select(AuditLog).where(AuditLog.seq < first_kept).order_by(AuditLog.seq.desc()).limit(1)
        )
        if last_pruned is None:
            return _PrunePlan(0)
        count = int(await db.scalar(select(func.count()).select_from(AuditLog).where(AuditLog.seq < first_kept)) or 0)
    return _PrunePlan(count, last_pruned.seq, last_pruned.hash)


def _audit_prune(args: argparse.Namespace) -> int:
    settings = _load_settings()
    cutoff = datetime.now(UTC) - timedelta(days=args.older_than)
    when = cutoff.isoformat(timespec="seconds")
    if args.dry_run:
        plan = _run(_with_audit_store(settings, lambda store: _prune_plan(store, cutoff)))
        checkpoint = f"the new checkpoint would be seq {plan.seq} ({plan.hash})" if plan.count else "no checkpoint"
        print(f"would prune {plan.count} audit records older than {when}; {checkpoint}; nothing was deleted")
        return 0
    # one DELETE: the bar pulses, then shows how many went
    with _Progress(f"Pruning audit records older than {cutoff:%Y-%m-%d}") as progress:
        pruned = _run(_with_audit_store(settings, lambda store: store.prune(cutoff)))
        progress.finish(pruned)
    outcome = "checkpoint written" if pruned else "nothing to prune, no checkpoint written"
    print(f"pruned {pruned} audit records older than {when}; {outcome}")
    return 0


# -- argument types: a malformed value is a usage error (exit 2, named by argparse) -------------------


def _iso_time(value: str) -> datetime:
    """An ISO 8601 date or time, as an aware UTC time (one without a zone is taken as UTC)."""
    try:
        return utc(datetime.fromisoformat(value))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an ISO 8601 date or time (such as 2025-01-31 or 2025-01-31T09:30:00+01:00)"
        ) from None


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive whole number")
    return number


def _days(value: str) -> int:
    number = _positive_int(value)
    try:
        datetime.now(UTC) - timedelta(days=number)
    except OverflowError:
        raise argparse.ArgumentTypeError(f"{value!r} days reach back before the year 1") from None
    return number


def _port(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number (0 to 65535)")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thallus", description="Thallus: a security layer for HTTP APIs.")
    parser.add_argument("--version", action="version", version=f"thallus {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="serve the API with uvicorn (settings from THALLUS_* variables)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8000, help="port to bind (default 8000)")
    serve.add_argument("--workers", type=_positive_int, default=1, help="worker processes (default 1)")
    serve.set_defaults(handler=_serve)

    db = commands.add_parser("db", help="database administration")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    db_commands.add_parser("upgrade", help="apply every pending migration").set_defaults(handler=_db_upgrade)

    users = commands.add_parser("users", help="user administration")
    user_commands = users.add_subparsers(dest="users_command", required=True, metavar="COMMAND")
    create = user_commands.add_parser("create", help="create a user")
    create.add_argument("--email", required=True)
    create.add_argument("--password", required=True, help="the password, or - to read it from standard input")
    create.add_argument("--name", default="")
    create.add_argument("--admin", action="store_true", help="give the admin role")
    create.add_argument("--api-access", action="store_true", help="allow the user to create API keys")
    create.set_defaults(handler=_users_create)
    listing = user_commands.add_parser("list", help="one user a line: id email role features created name")
    listing.add_argument("--json", action="store_true", help="print a JSON array of users instead")
    listing.set_defaults(handler=_users_list)
    change = user_commands.add_parser(
        "set", help="change a user's role, features or active flag (every instance follows within 1 s)"
    )
    change.add_argument("--email", required=True)
    change.add_argument("--role", choices=("user", "admin"))
    change.add_argument("--api-access", action=argparse.BooleanOptionalAction, help="the api_access feature")
    change.add_argument(
        "--active", action=argparse.BooleanOptionalAction, help="--no-active: its sessions and keys stop working"
    )
    change.set_defaults(handler=_users_set, usage_error=change.error)
    unlock = user_commands.add_parser("unlock", help="lift a login lockout (needs THALLUS_REDIS_URL)")
    unlock.add_argument("--email", required=True)
    unlock.set_defaults(handler=_users_unlock)

    keys = commands.add_parser("keys", help="API-key administration")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    key_create = key_commands.add_parser("create", help="create an API key and print it (once)")
    key_create.add_argument("--email", required=True, help="the user the key acts for")
    key_create.add_argument("--name", required=True, help="a label for the key")
    key_create.add_argument("--expires-at", type=_iso_time, help="ISO 8601 expiry time (UTC when no zone is given)")
    key_create.set_defaults(handler=_keys_create)

    audit = commands.add_parser("audit", help="the audit log")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    verify = audit_commands.add_parser("verify", help="walk the hash chain; exit 1 at the first broken link")
    verify.add_argument("--json", action="store_true", help="print the outcome as a JSON object")
    verify.set_defaults(handler=_audit_verify)
    export = audit_commands.add_parser("export", help="write records, oldest first, as JSON Lines or CSV")
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    export.add_argument("--output", help="a file (default: standard output)")
    export.add_argument("--action", action="append", help="only this action (repeatable)")
    export.add_argument("--user-id")
    export.add_argument("--outcome", choices=("success", "failure", "partial", "denied"))
    export.add_argument("--start-date", type=_iso_time, help="ISO 8601, inclusive (UTC when no zone is given)")
    export.add_argument("--end-date", type=_iso_time, help="ISO 8601, inclusive (UTC when no zone is given)")
    export.set_defaults(handler=_audit_export, usage_error=export.error)
    prune = audit_commands.add_parser("prune", help="delete old records (retention), keeping the chain verifiable")
    prune.add_argument("--older-than", type=_days, required=True, metavar="DAYS", help="a positive number of days")
    prune.add_argument(
        "--dry-run", action="store_true", help="print how many records would go and the new checkpoint; delete none"
    )
    prune.set_defaults(handler=_audit_prune)

    config = commands.add_parser("config", help="inspect the configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    show = config_commands.add_parser("show", help="print the effective policy for the current environment")
    show.add_argument("--json", action="store_true", help="print it as JSON")
    show.set_defaults(handler=_config_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.handler(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
