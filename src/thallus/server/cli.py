"""The ``thallus`` command: ``serve``, ``config show``, ``db upgrade``, ``users``, ``keys``.

Invalid settings stop every command with one line per problem on stderr
(``thallus: THALLUS_VARIABLE: reason``) and exit status 2; a refused operation (duplicate e-mail,
weak password, unknown user, unreachable database) prints ``thallus: reason`` and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from thallus import __version__
from thallus.cors import ALLOWED_HEADERS, ALLOWED_METHODS, EXPOSED_HEADERS
from thallus.errors import NotFoundError
from thallus.headers import CACHE_CONTROL, HeaderPolicy
from thallus.server.identity.passwords import default_concurrency
from thallus.server.identity.service import Identity
from thallus.server.settings import ServiceSettings
from thallus.settings import ConfigurationError

if TYPE_CHECKING:
    from thallus.server.audit.store import AuditStore, Verification
    from thallus.server.storage import Database
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
    "x-permitted-cross-domain-policies": "X-Permitted-Cross-Domain-Policies",
    "cache-control": "Cache-Control",
}


def effective_policy(settings: ServiceSettings) -> dict[str, Any]:
    """Everything a client will observe under ``settings``, as plain data."""
    policy = HeaderPolicy.from_settings(settings)
    cookie = settings.cookie_policy
    headers = {
        _DISPLAY_NAMES.get(name.decode(), name.decode()): value.decode("latin-1") for name, value in policy.headers
    }
    no_store_on = ["every error response (status >= 400)", *(f"paths under {path}" for path in settings.no_store_paths)]
    return {
        "environment": settings.env,
        "public_origin": settings.public_origin,
        "headers": headers,
        "headers_removed": ["Server", "X-Powered-By"],
        "cache_control": {_DISPLAY_NAMES[CACHE_CONTROL.decode()]: "no-store", "on": no_store_on},
        "cors": {
            "allowed_origins": list(settings.origins),
            "allow_credentials": True,
            "allowed_methods": list(ALLOWED_METHODS),
            "allowed_headers": list(dict.fromkeys((*ALLOWED_HEADERS, *settings.cors_extra_headers))),
            "exposed_headers": list(EXPOSED_HEADERS),
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
        },
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
    for user in users:
        features = ",".join(user.features) or "-"
        print(f"{user.id} {user.email} {user.role} {features} {user.created_at.isoformat()} {user.name or '-'}")
    return 0


def _users_set(args: argparse.Namespace) -> int:
    from thallus.server.identity.service import ClientInfo

    settings = _load_settings()
    if args.role is None and args.api_access is None and args.active is None:
        print(
            "thallus: nothing to change: give --role, --api-access/--no-api-access or --active/--no-active",
            file=sys.stderr,
        )
        return EXIT_CONFIGURATION

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
    from thallus.server.identity.service import ClientInfo, utc

    settings = _load_settings()
    try:
        expires_at = utc(datetime.fromisoformat(args.expires_at)) if args.expires_at else None
    except ValueError:
        print(f"thallus: --expires-at {args.expires_at!r} is not an ISO 8601 time", file=sys.stderr)
        return EXIT_FAILURE

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


def _audit_store(settings: ServiceSettings) -> tuple[Database, AuditStore]:
    from thallus.server.audit.store import AuditStore
    from thallus.server.storage import Database

    database = Database(settings.effective_database_url)
    return database, AuditStore(database)


def _audit_verify(args: argparse.Namespace) -> int:
    settings = _load_settings()

    async def work() -> Verification:
        database, store = _audit_store(settings)
        try:
            await database.migrate()
            return await store.verify()
        finally:
            await database.dispose()

    result = _run(work())
    if result.ok:
        print(f"audit chain intact: {result.checked} records")
        return 0
    row = f"seq {result.broken_seq}" + (f" (id {result.broken_id})" if result.broken_id else "")
    print(f"audit chain broken at {row}: {result.reason}; {result.checked} records before it are intact")
    return EXIT_FAILURE


def _audit_export(args: argparse.Namespace) -> int:
    from thallus.server.api.routes.audit_logs import export_lines
    from thallus.server.audit.store import AuditFilter
    from thallus.server.identity.service import utc

    settings = _load_settings()
    try:
        start = utc(datetime.fromisoformat(args.start_date)) if args.start_date else None
        end = utc(datetime.fromisoformat(args.end_date)) if args.end_date else None
    except ValueError:
        print("thallus: --start-date and --end-date take ISO 8601 times", file=sys.stderr)
        return EXIT_FAILURE
    query = AuditFilter(
        user_id=args.user_id, actions=tuple(args.action or ()), outcome=args.outcome, start=start, end=end
    )
    output = open(args.output, "wb") if args.output else sys.stdout.buffer  # noqa: SIM115 - closed below

    async def work() -> None:
        database, store = _audit_store(settings)
        try:
            await database.migrate()
            async for chunk in export_lines(store, query, args.format):
                output.write(chunk)
        finally:
            await database.dispose()

    try:
        _run(work())
    finally:
        if args.output:
            output.close()
    return 0


def _audit_prune(args: argparse.Namespace) -> int:
    from datetime import UTC, timedelta

    settings = _load_settings()
    cutoff = datetime.now(UTC) - timedelta(days=args.older_than)

    async def work() -> int:
        database, store = _audit_store(settings)
        try:
            await database.migrate()
            return await store.prune(cutoff)
        finally:
            await database.dispose()

    pruned = _run(work())
    print(f"pruned {pruned} audit records older than {cutoff.isoformat(timespec='seconds')}; checkpoint written")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thallus", description="Thallus: a security layer for HTTP APIs.")
    parser.add_argument("--version", action="version", version=f"thallus {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="serve the API with uvicorn (settings from THALLUS_* variables)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
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
    change.set_defaults(handler=_users_set)
    unlock = user_commands.add_parser("unlock", help="lift a login lockout (needs THALLUS_REDIS_URL)")
    unlock.add_argument("--email", required=True)
    unlock.set_defaults(handler=_users_unlock)

    keys = commands.add_parser("keys", help="API-key administration")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    key_create = key_commands.add_parser("create", help="create an API key and print it (once)")
    key_create.add_argument("--email", required=True, help="the user the key acts for")
    key_create.add_argument("--name", required=True, help="a label for the key")
    key_create.add_argument("--expires-at", help="ISO 8601 expiry time (UTC when no zone is given)")
    key_create.set_defaults(handler=_keys_create)

    audit = commands.add_parser("audit", help="the audit log")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    audit_commands.add_parser("verify", help="walk the hash chain; exit 1 at the first broken link").set_defaults(
        handler=_audit_verify
    )
    export = audit_commands.add_parser("export", help="write records, oldest first, as JSON Lines or CSV")
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    export.add_argument("--output", help="a file (default: standard output)")
    export.add_argument("--action", action="append", help="only this action (repeatable)")
    export.add_argument("--user-id")
    export.add_argument("--outcome", choices=("success", "failure", "partial", "denied"))
    export.add_argument("--start-date", help="ISO 8601, inclusive")
    export.add_argument("--end-date", help="ISO 8601, inclusive")
    export.set_defaults(handler=_audit_export)
    prune = audit_commands.add_parser("prune", help="delete old records (retention), keeping the chain verifiable")
    prune.add_argument("--older-than", type=int, required=True, metavar="DAYS")
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
