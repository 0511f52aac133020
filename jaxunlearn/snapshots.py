"""Member states written once each to disk (orbax), read back only when a member is restored.

``rewind`` keeps each member's state at every stage boundary: in host memory that grows with
the stages and the model (10 GB for five ResNet-18s over the demo's stages), so each goes to its
own folder ``run_dir/snapshots/NAME`` instead, written asynchronously from a host copy. The
run's checkpoint records which snapshots it uses (names, lineages and digests); a snapshot no
kept checkpoint and no live state uses is deleted (`SnapshotStore.keep_only`), so the purge
that removes checkpoints holding a deleted id removes the snapshots only they used.
"""

from __future__ import annotations

import hashlib
import pathlib
import shutil

import numpy as np

from jaxunlearn import checkpoint, faults
from jaxunlearn.files import atomic_write
from jaxunlearn.folder import RunFolder


class SnapshotError(RuntimeError):
    """A snapshot that is missing or does not match its digest."""


def digest(folder: pathlib.Path) -> str:
    """A SHA-256 over the files of a snapshot folder (names, sizes, contents)."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        h.update(checkpoint._digest(path).encode())
    return h.hexdigest()


class SnapshotStore:
    """The snapshot folders of one run (``run_dir/snapshots``)."""

    def __init__(self, run_dir, read_only: bool = False):
        import orbax.checkpoint as ocp

        self.root = RunFolder(run_dir).snapshots
        self.read_only = read_only
        self._ocp = ocp
        self._writer = None
        self._pending: list[str] = []
        self._jobs: list = []
        self._thread = None  # one background thread runs the writes, one after another

    def _options(self):
        import jax

        # Only this process reads or writes the folder: orbax must not wait for the others.
        return self._ocp.options.MultiprocessingOptions(
            primary_host=jax.process_index(), active_processes={jax.process_index()})

    def _checkpointer(self):
        if self._writer is None:
            mp = self._options()
            self._writer = self._ocp.Checkpointer(  # synchronous: it runs on our own thread
                self._ocp.PyTreeCheckpointHandler(multiprocessing_options=mp),
                multiprocessing_options=mp)
        return self._writer

    def write(self, name: str, tree: dict) -> None:
        """Starts writing ``tree`` (numpy leaves, not changed afterwards) as snapshot ``name``
        on a background thread and returns at once (orbax's own setup of a save costs tens of
        milliseconds whatever the size); `wait` finishes it. A process that only reads (not
        the first of several) writes nothing."""
        if self.read_only:
            return
        import concurrent.futures

        if self._thread is None:
            self._thread = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="jaxunlearn-snapshots")
        self._jobs.append(self._thread.submit(self._save, name, tree))
        self._pending.append(name)

    def _save(self, name: str, tree: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        writer = self._checkpointer()
        writer.save(self.root / name, args=self._ocp.args.PyTreeSave(tree), force=True)

    def wait(self) -> None:
        """Waits for the writes in flight, then writes each one's digest beside it
        (``NAME.sha256``, fsynced): a snapshot without one is a write that never finished."""
        jobs, self._jobs = self._jobs, []
        for job in jobs:
            job.result()  # raises what the write raised
        done, self._pending = self._pending, []
        for name in done:
            faults.point("snapshot.before_digest")
            atomic_write(self.root / f"{name}.sha256", digest(self.root / name))

    def read(self, name: str) -> dict:
        """Snapshot ``name``, checked against its digest. Raises SnapshotError. With several
        processes every one calls it (the first wrote the snapshot: the others wait for it)."""
        self.wait()
        import jax

        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"jaxunlearn snapshot {name}")
        folder, mark = self.root / name, self.root / f"{name}.sha256"
        if not folder.is_dir() or not mark.is_file():
            raise SnapshotError(f"snapshot {name} is missing from {self.root}")
        if digest(folder) != mark.read_text().strip():
            raise SnapshotError(f"snapshot {name} in {self.root} does not match its digest "
                                f"(damaged)")
        mp = self._options()
        reader = self._ocp.Checkpointer(self._ocp.PyTreeCheckpointHandler(
            multiprocessing_options=mp), multiprocessing_options=mp)
        restored = reader.restore(folder, args=self._ocp.args.PyTreeRestore())
        return _numpy(restored)

    def names(self) -> set[str]:
        """Every snapshot folder, finished or not."""
        if not self.root.is_dir():
            return set()
        return {p.name for p in self.root.iterdir() if p.is_dir()}

    def keep_only(self, used: set[str]) -> list[str]:
        """Deletes every snapshot not in ``used`` (writes that never finished included);
        returns the names deleted."""
        if self.read_only:
            return []
        self.wait()
        gone = sorted(self.names() - set(used))
        for name in gone:
            (self.root / f"{name}.sha256").unlink(missing_ok=True)
            shutil.rmtree(self.root / name, ignore_errors=True)
        for mark in self.root.glob("*.sha256") if self.root.is_dir() else []:
            if mark.name[:-len(".sha256")] not in self.names():
                mark.unlink()
        return gone

    def close(self) -> None:
        jobs, self._jobs = self._jobs, []
        for job in jobs:
            job.result()
        if self._thread is not None:
            self._thread.shutdown()
            self._thread = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _numpy(tree):
    if isinstance(tree, dict):
        return {k: _numpy(v) for k, v in tree.items()}
    return np.asarray(tree)
