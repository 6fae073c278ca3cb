"""Files only their owner may read: the data directory, the SQLite database, the audit journal,
the development secret, the workers' metrics snapshots (0700 directories, 0600 files, whatever
the process's umask).

They hold password hashes, session and key hashes, the audit trail and the key that signs
every token; on a shared host, a umask of 022 would otherwise make all of them world-readable.
Modes are set when a path is created; an operator's later ``chmod`` is left alone.
"""

from __future__ import annotations

import os
from pathlib import Path

DIRECTORY_MODE = 0o700
FILE_MODE = 0o600


def private_directory(path: Path) -> Path:
    """Create ``path`` and its missing parents as 0700 directories (existing ones are kept)."""
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=DIRECTORY_MODE)
        except FileExistsError:  # another process made it first
            continue
        os.chmod(directory, DIRECTORY_MODE)  # mkdir's mode passes through the umask
    return path


def private_file(path: Path) -> Path:
    """Create ``path`` empty as a 0600 file unless it exists (its directory as by :func:`private_directory`)."""
    private_directory(path.parent)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return path
    os.fchmod(descriptor, FILE_MODE)
    os.close(descriptor)
    return path


def replace_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically as a 0600 file: a temporary file beside it, renamed over
    it, so a reader sees the old content or the new, never a half-written file."""
    private_directory(path.parent)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.fchmod(descriptor, FILE_MODE)
        view = memoryview(data)
        while view:
            view = view[os.write(descriptor, view) :]
    finally:
        os.close(descriptor)
    os.replace(temporary, path)
