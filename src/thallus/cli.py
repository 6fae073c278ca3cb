"""The ``thallus`` command's entry point, installed with the library.

Its commands (``serve``, ``db``, ``users``, ``keys``, ``audit``, ``config``) belong to the reference
service, :mod:`thallus.server.cli`, which needs the ``server`` extra. Without it, ``thallus
--version`` still answers and every other command says what is missing and how to install it,
with exit status 2 (a usage error: nothing was attempted).

``thallus check`` is the exception: the scanner, :mod:`thallus.check` (the ``check`` extra), needs
nothing of the service and is dispatched before it is imported.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from thallus import __version__

SERVER_EXTRA = 'pip install "thallus[server]"'

#: Top-level modules that only the ``server`` extra installs.
SERVER_MODULES = frozenset(
    {
        "aiosqlite",
        "alembic",
        "anyio",
        "argon2",
        "asyncpg",
        "coredis",
        "email_validator",
        "fastapi",
        "fastapi_offline",
        "h11",
        "jwt",
        "rich",
        "sqlalchemy",
        "starlette",
        "uuid_utils",
        "uvicorn",
    }
)


def missing_server_module(exc: ModuleNotFoundError) -> str | None:
    """The ``server`` extra's module whose absence ``exc`` reports, if that is what it reports."""
    name = (exc.name or "").split(".")[0]
    return name if name in SERVER_MODULES else None


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["check"]:
        from thallus.check.cli import main as check_main

        return check_main(arguments[1:])
    try:
        from thallus.server.cli import main as server_main
    except ModuleNotFoundError as exc:
        missing = missing_server_module(exc)
        if missing is None:
            raise
        if arguments in (["--version"], ["-V"]):
            print(f"thallus {__version__} (library only)")
            return 0
        command = arguments[0] if arguments and not arguments[0].startswith("-") else None
        what = f"'thallus {command}'" if command else "the thallus command"
        print(
            f"thallus: {what} needs the reference service, which is not installed ({missing} is missing); "
            f"install it with: {SERVER_EXTRA}",
            file=sys.stderr,
        )
        return 2
    return server_main(arguments)


if __name__ == "__main__":
    sys.exit(main())
