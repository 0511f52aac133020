"""A run's folder, open (`RunDisk`: checkpoints, snapshots, deletion log and lock, closed
together), and what its files say before it is opened (`unborn`)."""

from __future__ import annotations

import contextlib
import os
import pathlib
import sqlite3

from jaxunlearn import checkpoint, deletion_log, durable, runlock
from jaxunlearn.folder import RunFolder
from jaxunlearn.snapshots import SnapshotStore


class RunDisk:
    """A run's folder, open: the paths of its files (``folder``), its checkpoints (``ckpts``),
    the member snapshots its strategies keep (``snapshots``), its deletion log (``log``; the
    primary process's only, None in the others) and its lock. Only the primary process
    writes. `close` closes them all, the lock last."""

    def __init__(self, out: pathlib.Path, primary: bool, lock: contextlib.ExitStack,
                 held: runlock.HeldLock | None = None):
        """``lock``: the run's lock, held (or an empty stack in a process that holds none);
        what opens here closes with it. ``held``: the lock itself (its holder record)."""
        self.folder, self._open, self.held = RunFolder(out), lock, held
        self.ckpts = checkpoint.Checkpoints(out, read_only=not primary)
        lock.callback(self.ckpts.close)
        self.snapshots = SnapshotStore(out, read_only=not primary)
        lock.callback(self.snapshots.close)
        # A log this open creates (or gives a schema) is put back as it was if `check_log`
        # refuses it: None when there was none, else its size (0: empty).
        path = self.folder.deletion_log
        self._log_found = path.stat().st_size if primary and path.exists() else None
        self.log = deletion_log.DeletionLog.open(out) if primary else None
        if self.log is not None:
            lock.callback(self.log.close)
            lock.callback(self._stop_taking)  # first: before the log closes

    def check_log(self, tree: dict, step: int) -> None:
        """`durable.LogMismatch` when the deletion log lacks what checkpoint ``step`` (its
        state ``tree``) applied; the log is then left as this open found it."""
        if self.log is None:
            return
        try:
            durable.check_log(self.log.records(), tree, step, self.folder.deletion_log)
        except durable.LogMismatch:
            if not self._log_found:  # none, or empty: this open created it or its schema
                self.log.close()
                path = self.folder.deletion_log
                path.unlink() if self._log_found is None else os.truncate(path, 0)
            raise

    def take_requests(self, taking: bool) -> None:
        """Says in the lock's holder record whether this process still applies the `forget`
        requests logged while it holds the run; a request recorded meanwhile reads it in the
        same log transaction (see `jaxunlearn.deletion_queue.Queue.close`)."""
        if self.held is None or self.held.record.get("takes_requests", False) == taking:
            return
        with self.log.transaction():
            self.held.update(takes_requests=taking)

    def _stop_taking(self) -> None:
        with contextlib.suppress(OSError, sqlite3.Error, deletion_log.DeletionLogError):
            self.take_requests(False)  # (the lock's release says it too)

    def close(self) -> None:
        self._open.close()


def unborn(out: pathlib.Path) -> bool:
    """Whether the run in ``out`` stopped before its first checkpoint was complete (nothing
    to restore, nothing deleted: it starts again). A folder without manifests that holds
    later checkpoints or logged requests lost them (removed by hand): it is refused, never
    started again, which would discard its checkpoints and the deletions they applied."""
    ckpts = checkpoint.Checkpoints(out, read_only=True)
    if ckpts.steps():
        return False
    later = [step for step in ckpts._step_dirs() if step > 0]
    logged = deletion_log.has_requests(out)
    if later or logged:
        found = ", ".join(([f"checkpoint folders {later}"] if later else [])
                          + (["a deletion log with requests"] if logged else []))
        raise checkpoint.CheckpointError(
            f"{ckpts.manifests} is missing or empty, but {out} has {found}: the manifests "
            f"that vouch for its checkpoints were removed, and starting the run again would "
            f"discard them and the deletions they applied. Nothing was changed. Put back "
            f"checkpoints/manifests (from a backup), or start a new run")
    return True
