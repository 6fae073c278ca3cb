"""The ``thallus`` command: ``serve`` and ``config show``.

Invalid settings stop every command with one line per problem on stderr
(``thallus: THALLUS_VARIABLE: reason``) and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from thallus import __version__
from thallus.cors import ALLOWED_HEADERS, ALLOWED_METHODS, EXPOSED_HEADERS
from thallus.headers import CACHE_CONTROL, HeaderPolicy
from thallus.settings import ConfigurationError, Settings

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


def effective_policy(settings: Settings) -> dict[str, Any]:
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
    lines += ["", "Session cookie:", f"  {'; '.join(attributes)}"]
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
    print("\n".join(lines))


def _load_settings() -> Settings:
    try:
        return Settings.load()
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

    settings = _load_settings()  # fail fast, before uvicorn starts workers
    uvicorn.run(
        "thallus.service:serve_factory",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_config=None,
        log_level=settings.log_level.lower(),
        access_log=False,
        server_header=False,
        proxy_headers=False,
    )
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
