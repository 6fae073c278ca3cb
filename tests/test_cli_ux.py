"""The ``thallus`` command as its users meet it, run as a real process: exit statuses (2 for a usage
error, 1 for a failed operation), failures on stderr and results on stdout, ``--json`` on the read
commands, ``audit prune --dry-run``, and a progress bar on a terminal (a pseudo-terminal here) that
never shows up in a pipe."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import shutil
import struct
import subprocess
import termios
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from tests.server import THALLUS
from thallus.audit import AuditEvent
from thallus.server.audit.store import AuditFilter, AuditStore
from thallus.server.audit.writer import prepare
from thallus.server.storage import Database
from thallus.server.storage.models import AuditCheckpoint, AuditLog

PASSWORD = "Correct-Horse-Battery-9!"
OLD, NEW = 200, 100  # records created 400 days ago, and now
#: What could make Rich draw, or refuse to draw, whatever the file is: none of it from the developer's shell.
TERMINAL_VARIABLES = ("FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS", "LINES", "TERM")
ESCAPE = "\x1b["


def environment(data_dir: Path, database_url: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("THALLUS_") and k not in TERMINAL_VARIABLES}
    env.update(THALLUS_DATA_DIR=str(data_dir), TERM="xterm-256color")
    if database_url is not None:
        env["THALLUS_DATABASE_URL"] = database_url
    env.update(extra)
    return env


def thallus(
    data_dir: Path, *args: str, database_url: str | None = None, **extra: str
) -> subprocess.CompletedProcess[str]:
    """The command with stdout and stderr each a pipe (as in CI or ``$(…)``)."""
    return subprocess.run(
        [THALLUS, *args],
        env=environment(data_dir, database_url, **extra),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@dataclass(frozen=True)
class OnTerminal:
    returncode: int
    stdout: str  # a pipe, unless the terminal took it too
    terminal: str  # everything written to the pseudo-terminal


def on_terminal(data_dir: Path, *args: str, stdout_too: bool = False, **extra: str) -> OnTerminal:
    """The command with stderr (and, with ``stdout_too``, stdout) on a 120×30 pseudo-terminal."""
    controller, device = os.openpty()
    fcntl.ioctl(device, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: every copy of the device is closed
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        process = subprocess.Popen(
            [THALLUS, *args],
            env=environment(data_dir, **extra),
            stdin=subprocess.DEVNULL,
            stdout=device if stdout_too else subprocess.PIPE,
            stderr=device,
        )
        os.close(device)
        stdout, _ = process.communicate(timeout=60)
        reader.join(10)
    finally:
        os.close(controller)
    # stdout read as subprocess.run(text=True) reads it (universal newlines: CSV's \r\n is \n)
    text = (stdout or b"").decode().replace("\r\n", "\n")
    return OnTerminal(process.returncode, text, b"".join(chunks).decode(errors="replace"))


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite+aiosqlite:///{data_dir / 'thallus.db'}"  # the embedded default in THALLUS_DATA_DIR


async def _open(url: str) -> tuple[Database, AuditStore]:
    database = Database(url)
    await database.migrate()
    return database, AuditStore(database)


def seed(url: str) -> list[AuditLog]:
    """OLD logins 400 days old, then NEW logouts; every record, oldest first."""

    async def scenario() -> list[AuditLog]:
        database, store = await _open(url)
        try:
            then = datetime.now(UTC) - timedelta(days=400)
            old = [AuditEvent("login", "success", created_at=then + timedelta(seconds=i)) for i in range(OLD)]
            await store.append([prepare(event) for event in old])
            await store.append([prepare(AuditEvent("logout", "success")) for _ in range(NEW)])
            return [row async for row in store.stream(AuditFilter())]
        finally:
            await database.dispose()

    return asyncio.run(scenario())


def stored(url: str) -> tuple[int, list[tuple[int, str]]]:
    """How many records there are, and the checkpoints (seq, hash)."""

    async def scenario() -> tuple[int, list[tuple[int, str]]]:
        database, store = await _open(url)
        try:
            async with database.session() as db:
                checkpoints = (await db.execute(select(AuditCheckpoint.seq, AuditCheckpoint.hash))).all()
            return await store.count(), [(int(seq), str(hash_)) for seq, hash_ in checkpoints]
        finally:
            await database.dispose()

    return asyncio.run(scenario())


def tamper(url: str, seq: int) -> None:
    async def scenario() -> None:
        database = Database(url)
        try:
            async with database.session() as db:
                await db.execute(update(AuditLog).where(AuditLog.seq == seq).values(outcome="denied"))
                await db.commit()
        finally:
            await database.dispose()

    asyncio.run(scenario())


@pytest.fixture
def seeded(tmp_path: Path) -> list[AuditLog]:
    """The embedded SQLite database of ``tmp_path`` with OLD + NEW records."""
    return seed(sqlite_url(tmp_path))


# -- usage errors: exit 2, argparse names the argument, nothing is attempted ------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["audit", "export", "--start-date", "notadate"], "argument --start-date: 'notadate' is not an ISO 8601 date or time"),
        (["audit", "export", "--end-date", "2025-13-01"], "argument --end-date: '2025-13-01' is not an ISO 8601 date or time"),
        (["audit", "export", "--start-date", "2025-02-01", "--end-date", "2025-01-31"], "--end-date is before --start-date"),
        (["audit", "export", "--format", "xml"], "argument --format: invalid choice: 'xml'"),
        (["audit", "export", "--outcome", "maybe"], "argument --outcome: invalid choice: 'maybe'"),
        (["audit", "prune", "--older-than", "0"], "argument --older-than: '0' is not a positive whole number"),
        (["audit", "prune", "--older-than", "-30"], "argument --older-than: '-30' is not a positive whole number"),
        (["audit", "prune", "--older-than", "a month"], "argument --older-than: 'a month' is not a positive whole number"),
        (["audit", "prune", "--older-than", "99999999999"], "argument --older-than: '99999999999' days reach back before the year 1"),
        (["audit", "prune"], "the following arguments are required: --older-than"),
        (["audit", "verify", "--format", "csv"], "unrecognized arguments: --format csv"),
        (["keys", "create", "--email", "ada@example.com", "--name", "x", "--expires-at", "soon"], "argument --expires-at: 'soon' is not an ISO 8601 date or time"),
        (["serve", "--port", "70000"], "argument --port: '70000' is not a port number (0 to 65535)"),
        (["serve", "--workers", "0"], "argument --workers: '0' is not a positive whole number"),
        (["users", "set", "--email", "ada@example.com"], "nothing to change: give --role, --api-access/--no-api-access or --active/--no-active"),
    ],
)  # fmt: skip
def test_usage_errors_exit_2_before_anything_is_attempted(tmp_path: Path, args: list[str], message: str) -> None:
    result = thallus(tmp_path, *args)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith("usage: thallus ")
    assert f"error: {message}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "thallus.db").exists(), "no database was opened"


def test_operational_failures_exit_1_on_stderr(tmp_path: Path, seeded: list[AuditLog]) -> None:
    unwritable = thallus(tmp_path, "audit", "export", "--output", str(tmp_path / "no-such-dir" / "out.jsonl"))
    assert (unwritable.returncode, unwritable.stdout) == (1, "")
    assert (
        unwritable.stderr
        == f"thallus: cannot write {tmp_path / 'no-such-dir' / 'out.jsonl'}: No such file or directory\n"
    )
    nowhere = "postgresql+asyncpg://postgres@127.0.0.1:1/nowhere"
    unreachable = thallus(tmp_path, "audit", "verify", "--json", database_url=nowhere)
    assert (unreachable.returncode, unreachable.stdout) == (1, "")
    assert unreachable.stderr.startswith("thallus: the database is unavailable: ")
    assert "Traceback" not in unreachable.stderr


def test_an_export_cut_short_by_its_reader_ends_quietly(tmp_path: Path, seeded: list[AuditLog]) -> None:
    """``thallus audit export | head -1``: no traceback, no second error at exit."""
    process = subprocess.Popen(
        [THALLUS, "audit", "export"],
        env=environment(tmp_path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    first = json.loads(process.stdout.readline())
    process.stdout.close()  # OLD + NEW records are far more than a pipe holds: the export is still writing
    stderr = process.stderr.read()
    assert process.wait(60) == 1
    assert first["seq"] == 1
    assert stderr == b""


# -- audit verify: the problem on stderr, --json on stdout ---------------------------------------------


def test_verify_reports_a_break_on_stderr_and_as_json(database_url: str, tmp_path: Path) -> None:
    rows = seed(database_url)
    intact = thallus(tmp_path, "audit", "verify", database_url=database_url)
    assert (intact.returncode, intact.stdout, intact.stderr) == (0, f"audit chain intact: {OLD + NEW} records\n", "")
    as_json = thallus(tmp_path, "audit", "verify", "--json", database_url=database_url)
    assert (as_json.returncode, as_json.stderr) == (0, "")
    assert json.loads(as_json.stdout) == {
        "ok": True,
        "checked": OLD + NEW,
        "broken_seq": None,
        "broken_id": None,
        "reason": None,
    }

    tamper(database_url, 120)
    broken = thallus(tmp_path, "audit", "verify", database_url=database_url)
    assert (broken.returncode, broken.stdout) == (1, "")
    assert broken.stderr == (
        f"thallus: audit chain broken at seq 120 (id {rows[119].id}): its content does not match its hash; "
        "119 records before it are intact\n"
    )
    broken_json = thallus(tmp_path, "audit", "verify", "--json", database_url=database_url)
    assert broken_json.returncode == 1
    assert json.loads(broken_json.stdout) == {
        "ok": False,
        "checked": 119,
        "broken_seq": 120,
        "broken_id": rows[119].id,
        "reason": "its content does not match its hash",
    }
    assert broken_json.stderr == broken.stderr, "the failure is on stderr with --json too"


# -- audit prune --dry-run ------------------------------------------------------------------------------


def test_prune_dry_run_counts_what_prune_deletes_and_deletes_nothing(database_url: str, tmp_path: Path) -> None:
    rows = seed(database_url)
    last_old = rows[OLD - 1]
    dry = thallus(tmp_path, "audit", "prune", "--older-than", "365", "--dry-run", database_url=database_url)
    assert (dry.returncode, dry.stderr) == (0, "")
    assert dry.stdout.startswith(f"would prune {OLD} audit records older than ")
    assert dry.stdout.endswith(f"; the new checkpoint would be seq {OLD} ({last_old.hash}); nothing was deleted\n")
    assert stored(database_url) == (OLD + NEW, []), "nothing deleted, no checkpoint"
    assert (
        thallus(tmp_path, "audit", "verify", database_url=database_url).stdout
        == f"audit chain intact: {OLD + NEW} records\n"
    )

    pruned = thallus(tmp_path, "audit", "prune", "--older-than", "365", database_url=database_url)
    assert (pruned.returncode, pruned.stderr) == (0, "")
    assert pruned.stdout.startswith(f"pruned {OLD} audit records older than ")
    assert pruned.stdout.endswith("; checkpoint written\n")
    assert stored(database_url) == (NEW, [(OLD, last_old.hash)]), "the dry run named the very checkpoint prune wrote"

    again = thallus(tmp_path, "audit", "prune", "--older-than", "365", "--dry-run", database_url=database_url)
    assert again.returncode == 0
    assert again.stdout.startswith("would prune 0 audit records older than ")
    assert again.stdout.endswith("; no checkpoint; nothing was deleted\n")
    nothing = thallus(tmp_path, "audit", "prune", "--older-than", "365", database_url=database_url)
    assert nothing.stdout.endswith("; nothing to prune, no checkpoint written\n")
    assert stored(database_url) == (NEW, [(OLD, last_old.hash)])


# -- users list --json --------------------------------------------------------------------------------


def test_users_list_json(tmp_path: Path) -> None:
    empty = thallus(tmp_path, "users", "list", "--json")
    assert (empty.returncode, json.loads(empty.stdout)) == (0, [])
    ada = thallus(
        tmp_path,
        "users",
        "create",
        "--email",
        "ada@example.com",
        "--password",
        PASSWORD,
        "--name",
        "Ada",
        "--api-access",
    )
    assert ada.returncode == 0, ada.stderr
    assert (
        thallus(
            tmp_path, "users", "create", "--email", "root@example.com", "--password", PASSWORD, "--admin"
        ).returncode
        == 0
    )
    assert thallus(tmp_path, "users", "set", "--email", "root@example.com", "--no-active").returncode == 0
    listed = thallus(tmp_path, "users", "list", "--json")
    assert (listed.returncode, listed.stderr) == (0, "")
    users: list[dict[str, Any]] = json.loads(listed.stdout)
    assert [{k: v for k, v in user.items() if k not in ("id", "created_at")} for user in users] == [
        {"email": "ada@example.com", "name": "Ada", "role": "user", "features": ["api_access"], "is_active": True},
        {"email": "root@example.com", "name": "", "role": "admin", "features": [], "is_active": False},
    ]
    assert users[0]["id"] == ada.stdout.split()[0]
    assert datetime.fromisoformat(users[0]["created_at"]).tzinfo is not None
    assert PASSWORD not in listed.stdout and "argon2" not in listed.stdout


# -- progress: on a terminal, never in a pipe ----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (["audit", "verify"], ["Verifying the audit chain", f"{OLD + NEW}/{OLD + NEW}"]),
        (["audit", "verify", "--json"], ["Verifying the audit chain", f"{OLD + NEW}/{OLD + NEW}"]),
        (["audit", "export", "--action", "logout"], ["Exporting audit records", f"{NEW}/{NEW}"]),
        (["audit", "export", "--format", "csv"], ["Exporting audit records", f"{OLD + NEW}/{OLD + NEW}"]),
        (["audit", "prune", "--older-than", "365"], ["Pruning audit records older than", f"{OLD}/{OLD}"]),
    ],
)
def test_progress_on_a_terminal_and_not_in_a_pipe(tmp_path: Path, args: list[str], shown: list[str]) -> None:
    piped_dir, terminal_dir = tmp_path / "piped", tmp_path / "terminal"
    piped_dir.mkdir()
    seed(sqlite_url(piped_dir))
    shutil.copytree(piped_dir, terminal_dir)  # the same records, for the same output
    # a CI job that forces colour still gets no bar in its log: stderr is not a terminal
    piped = thallus(piped_dir, *args, FORCE_COLOR="1", TTY_COMPATIBLE="1")
    assert (piped.returncode, piped.stderr) == (0, ""), "nothing at all on stderr"
    assert ESCAPE not in piped.stdout

    terminal = on_terminal(terminal_dir, *args)
    assert terminal.returncode == 0, terminal.terminal
    assert ESCAPE in terminal.terminal, "drawn with escape codes"
    for text in shown:
        assert text in terminal.terminal, (text, terminal.terminal)
    assert ESCAPE not in terminal.stdout, "the bar stays on stderr"
    if args[1] == "prune":  # its summary names the cutoff, to the second
        assert terminal.stdout.startswith(f"pruned {OLD} audit records") and piped.stdout.startswith(f"pruned {OLD} ")
    else:
        assert terminal.stdout == piped.stdout, "stdout is the same, byte for byte, with or without the bar"


def test_no_progress_on_a_dumb_terminal(tmp_path: Path, seeded: list[AuditLog]) -> None:
    terminal = on_terminal(tmp_path, "audit", "verify", TERM="dumb")
    assert (terminal.returncode, terminal.terminal) == (0, "")
    assert terminal.stdout == f"audit chain intact: {OLD + NEW} records\n"


def test_an_export_to_the_terminal_itself_draws_no_bar(tmp_path: Path, seeded: list[AuditLog]) -> None:
    """The records scrolling by are the progress; a bar would be torn through them."""
    terminal = on_terminal(tmp_path, "audit", "export", "--action", "logout", stdout_too=True)
    assert terminal.returncode == 0
    assert "Exporting" not in terminal.terminal and ESCAPE not in terminal.terminal
    lines = terminal.terminal.splitlines()
    assert [json.loads(line)["action"] for line in lines] == ["logout"] * NEW
    with_file = on_terminal(tmp_path, "audit", "export", "--output", str(tmp_path / "all.jsonl"), stdout_too=True)
    assert with_file.returncode == 0
    assert "Exporting audit records" in with_file.terminal, "to a file, the terminal shows the bar"
    assert len((tmp_path / "all.jsonl").read_text().splitlines()) == OLD + NEW
