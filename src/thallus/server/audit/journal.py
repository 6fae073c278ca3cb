"""The spill journal: append-only JSON Lines files, fsync'd per batch, replayed in order.

When the database is unreachable or too slow, the writer appends its batches here instead. Each
writer process owns one file (``journal-<id>.jsonl``) and holds an exclusive ``flock`` on it while it
is open, so another process can tell a live journal from an orphan left by a process that died or
was stopped: orphans are replayed by whoever finds them first (their lock is free).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from thallus.correlation import uuid7
from thallus.server.storage.private import private_file

logger = logging.getLogger("thallus.audit")

PATTERN = "journal-*.jsonl"


class Journal:
    """This process's journal file, created on the first spill."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / f"journal-{uuid7()}.jsonl"
        self._file: IO[str] | None = None

    def _open(self) -> IO[str]:
        if self._file is None:
            private_file(self.path)  # 0600 in a 0700 directory: the records name users and addresses
            file = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held open on purpose
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._file = file
        return self._file

    def append(self, records: Iterable[dict[str, Any]], *, sync: bool = True) -> int:
        """Append records (one JSON object a line) and, unless told otherwise, fsync."""
        file = self._open()
        lines = [json.dumps(record, separators=(",", ":"), default=str) + "\n" for record in records]
        file.write("".join(lines))
        file.flush()
        if sync:
            os.fsync(file.fileno())
        return len(lines)

    def sync(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def pending(self) -> bool:
        return self._file is not None and self.path.exists() and self.path.stat().st_size > 0

    def read(self) -> list[dict[str, Any]]:
        if self._file is None:
            return []
        self.sync()
        return read_records(self.path)

    def clear(self) -> None:
        """Empty the file once its records are safely in the database."""
        if self._file is not None:
            self._file.truncate(0)
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is None:
            return
        self.sync()
        empty = self.path.stat().st_size == 0
        fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
        self._file.close()
        self._file = None
        if empty:
            self.path.unlink(missing_ok=True)


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a journal file; a torn last line (a crash mid-write) is skipped and logged."""
    records = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                logger.error("skipping an unreadable journal line %s:%d", path.name, number)
    return records


@contextmanager
def orphans(directory: Path, own: Path | None = None) -> Iterator[list[Path]]:
    """Journal files no live process holds, locked for the caller until the block ends."""
    held: list[tuple[Path, IO[str]]] = []
    try:
        if directory.is_dir():
            for path in sorted(directory.glob(PATTERN)):
                if own is not None and path == own:
                    continue
                file: IO[str] = open(path, encoding="utf-8")  # noqa: SIM115 - closed in finally
                try:
                    fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    file.close()  # a live writer holds it
                    continue
                held.append((path, file))
        yield [path for path, _ in held]
    finally:
        for _, file in held:
            fcntl.flock(file.fileno(), fcntl.LOCK_UN)
            file.close()
