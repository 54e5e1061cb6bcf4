"""A full disk, a read-only project or a busy catalog, as one-line ``StorageError``s instead of tracebacks.

These are conditions of the machine, not bugs, so the user gets what happened, where, and what to do.
Nothing half-written is ever recorded: the store writes to a temporary name and renames it into place,
and catalog writes are transactions that roll back, so "run the same command again" is always safe.
"""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

from flywheel.errors import StorageError

_FULL = {errno.ENOSPC, errno.EDQUOT}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}
# SQLite's primary result codes (the low byte of the extended code Python >= 3.11 exposes).
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY, _SQLITE_FULL = 5, 6, 8, 13


def disk_full(where: Path | str) -> StorageError:
    return StorageError(
        f"disk full: cannot write {where}",
        hint="free some space on that disk, then run the same command again: what finished is kept "
             "and nothing half-written was recorded",
    )


def read_only(where: Path | str) -> StorageError:
    return StorageError(
        f"the project is read-only: cannot write {where}",
        hint="make the project folder writable (its permissions, or a read-only mount), or copy it somewhere "
             "writable; nothing was changed",
    )


def busy(where: Path | str, waited_s: float) -> StorageError:
    return StorageError(
        f"the catalog {where} is busy: another flywheel command has been writing to it for more than {waited_s:g} s",
        hint="wait for the other command to finish (or stop it), then run this one again; nothing was changed",
    )


def from_os_error(err: OSError, where: Path | str | None = None, *, in_project: bool = True) -> StorageError | None:
    """The StorageError for a full disk or an unwritable path, or None (then it is not ours to explain).
    ``in_project=False``: the path may be anywhere (an export folder), so the message does not blame the project."""
    where = where or err.filename or "the project"
    if err.errno in _FULL:
        return disk_full(where)
    if err.errno in _READ_ONLY and in_project:
        return read_only(where)
    if err.errno in _READ_ONLY:
        what = "read-only file system" if err.errno == errno.EROFS else "permission denied"
        return StorageError(f"{what}: {where}", hint="pick a folder you can write to, or fix its permissions")
    return None


def from_sqlite_error(err: sqlite3.Error, path: Path | str, busy_timeout_s: float) -> StorageError | None:
    """The StorageError for SQLite's 'disk full', 'read-only' and 'locked' failures (the last after waiting
    ``busy_timeout_s``), or None."""
    code = getattr(err, "sqlite_errorcode", None)  # Python >= 3.11; the message is the fallback
    primary = code & 0xFF if isinstance(code, int) else None
    text = str(err).lower()
    if primary == _SQLITE_FULL or "database or disk is full" in text:
        return disk_full(f"the catalog {path}")
    if primary == _SQLITE_READONLY or "readonly database" in text:
        return read_only(f"the catalog {path}")
    if primary in (_SQLITE_BUSY, _SQLITE_LOCKED) or "database is locked" in text:
        return busy(path, busy_timeout_s)
    return None
