"""Files written whole or not at all: `atomic_write` writes to a temporary file beside the
target, fsyncs it, renames it over the target and fsyncs the folder, so that a crash or a
power cut leaves either the old file or the new one, never a torn or empty one."""

from __future__ import annotations

import errno
import os
import pathlib
from typing import IO, Callable


def fsync_dir(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, content: str | bytes | Callable[[IO[bytes]], None]) -> None:
    """Replaces ``path`` by ``content`` (text, bytes, or a function that writes to the open
    binary file), durably."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


_FULL = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
# What the libraries underneath say when a resource fails without an OSError: SQLite,
# tensorstore (orbax's array writer) and XLA.
_SAID = (("No space left on device", "the disk is full"),
         ("database or disk is full", "the disk is full"),
         ("Read-only file system", "the file system is read-only"),
         ("attempt to write a readonly database", "the run folder is read-only"),
         ("Permission denied", "a file of the run folder cannot be written (permission denied)"),
         ("RESOURCE_EXHAUSTED", "out of memory"),
         ("Out of memory", "out of memory"),
         ("out of memory", "out of memory"))


def resource_problem(error: BaseException) -> str | None:
    """What resource failed, when ``error`` (or an error it was raised from) says that the
    disk is full, a file system or file is read-only, or memory ran out; None otherwise."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, MemoryError):
            return "out of host memory"
        if isinstance(error, OSError) and error.errno in _FULL:
            return f"the disk is full{_where(error)}"
        if isinstance(error, OSError) and error.errno in _READ_ONLY:
            return f"a file cannot be written{_where(error)} (read-only or permission denied)"
        text = str(error)
        for phrase, problem in _SAID:
            if phrase in text:
                return problem
        error = error.__cause__ or error.__context__
    return None


def _where(error: OSError) -> str:
    return f" ({error.filename})" if error.filename else ""
