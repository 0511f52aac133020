"""An exclusive lock on a run folder, so that two processes never modify the same run at once.

Usage::

    with run_lock(run_dir, purpose="unlearn"):
        ...  # modify the run folder

The lock is an ``fcntl.flock`` on ``run_dir/.lock``. While it is held, the lock file holds one
JSON line describing the holder (``pid``, ``host``, ``purpose``, ``since`` and ``command``) so
that a second process can say who is using the run.

Semantics worth knowing:

* The lock is released automatically by the kernel when the holding process exits for any
  reason, including ``kill -9`` or a crash: there is no stale lock to clean up by hand. The lock
  file itself is never deleted (deleting lock files lets two processes lock two different files
  with the same name); it stays in the run folder, empty while nobody holds it.
* The lock belongs to the open file, not to the process or thread: taking it a second time from
  the same process (e.g. nested ``run_lock`` on the same folder) fails with :class:`RunLocked`
  rather than deadlocking or silently succeeding. A child created by a bare ``os.fork`` shares
  the open file and keeps the lock alive until it exits too; ``subprocess`` children do not
  (the file descriptor is close-on-exec).
* ``flock`` is reliable on local file systems. On some network file systems (older NFS, some
  FUSE mounts) it may be emulated or ignored; keep run folders that several machines modify on
  a file system with working ``flock``.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import pathlib
import socket
import sys
import time

from jaxunlearn.folder import LOCK

LOCK_NAME = LOCK  # (jaxunlearn.folder)
_POLL_S = 0.05


class NoRunFolder(FileNotFoundError):
    """The given run folder does not exist (or is not a folder)."""


class RunLocked(RuntimeError):
    """Another process holds the run folder's lock; the message says who and what to do."""

    def __init__(self, run_dir, holder: dict | None):
        self.run_dir = pathlib.Path(run_dir)
        self.holder = holder
        super().__init__(f"run folder {self.run_dir} is in use by another process "
                         f"({_describe_holder(holder)}); wait for it to finish, or stop it; "
                         "the lock is released automatically when that process exits")


def _describe_holder(holder: dict | None) -> str:
    if not holder:
        return "holder details not recorded yet"
    parts = []
    if holder.get("pid") is not None:
        parts.append(f"pid {holder['pid']}")
    if holder.get("host"):
        parts.append(f"on host {holder['host']}")
    if holder.get("purpose"):
        parts.append(f"purpose {holder['purpose']!r}")
    if holder.get("command"):
        parts.append(f"command {holder['command']!r}")
    if holder.get("since"):
        parts.append(f"since {holder['since']}")
    return ", ".join(parts) or "holder details not recorded yet"


def check_run_dir(run_dir) -> pathlib.Path:
    """Returns ``run_dir`` as a Path; raises :class:`NoRunFolder` if it is not an existing folder."""
    run_dir = pathlib.Path(run_dir)
    if not run_dir.exists():
        raise NoRunFolder(errno.ENOENT, f"no run folder at {run_dir}", str(run_dir))
    if not run_dir.is_dir():
        raise NoRunFolder(errno.ENOTDIR, f"no run folder at {run_dir} (it is a file, "
                          "not a folder)", str(run_dir))
    return run_dir


def read_holder(run_dir) -> dict | None:
    """What the current (or last killed) holder recorded in the lock file, or None.

    This does not tell whether the lock is held: only trying to take it does. The lock file is
    emptied on a normal release, so content usually means a live holder or one that was killed.
    """
    try:
        text = (pathlib.Path(run_dir) / LOCK_NAME).read_text()
    except OSError:
        return None
    try:
        holder = json.loads(text.strip().splitlines()[0]) if text.strip() else None
    except (json.JSONDecodeError, IndexError):
        return None
    return holder if isinstance(holder, dict) else None


def _holder_record(purpose: str) -> dict:
    command = " ".join(sys.argv) if sys.argv else ""
    if len(command) > 200:
        command = command[:197] + "..."
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "purpose": purpose,
        "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }


class HeldLock:
    """The lock, held: its file's ``path``, and `update` to change what the holder record says
    (e.g. whether the holder still takes deletion requests)."""

    def __init__(self, fd: int, path: pathlib.Path, record: dict):
        self._fd, self.path, self.record = fd, path, record

    def update(self, **fields) -> None:
        """Rewrites the holder record with ``fields`` changed (fsynced: a reader that takes
        a decision on it sees it)."""
        self.record = {**self.record, **fields}
        line = (json.dumps(self.record) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, line, 0)
        os.fsync(self._fd)

    def __fspath__(self) -> str:
        return os.fspath(self.path)


@contextlib.contextmanager
def run_lock(run_dir, wait: float = 0.0, purpose: str = ""):
    """Holds the exclusive lock on ``run_dir`` for the body of the ``with`` block.

    ``wait``: seconds to keep retrying (every 0.05 s) while another process holds the lock;
    0 fails at once. Raises :class:`RunLocked` (naming the holder) if the lock is still busy,
    :class:`NoRunFolder` if ``run_dir`` is not an existing folder. Yields a `HeldLock`.
    """
    run_dir = check_run_dir(run_dir)
    if not wait >= 0:  # also rejects NaN
        raise ValueError(f"wait must be a number of seconds >= 0, got {wait!r}")
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RunLocked(run_dir, read_holder(run_dir)) from None
                time.sleep(_POLL_S)
        try:
            os.ftruncate(fd, 0)
            record = _holder_record(purpose)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            yield HeldLock(fd, path, record)
        finally:
            # Empty the file while still holding the lock, so nobody reads a stale holder.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
