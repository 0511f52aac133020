"""Checkpoints of a run, with orbax-checkpoint, that are complete or ignored, never half-read.

A run folder keeps its checkpoints in ``checkpoints/``: orbax writes step ``N`` as the folder
``checkpoints/N`` (into a temporary folder first, renamed when committed) with four items:

* ``state``: host numpy pytrees of the ensemble and baseline states (and the ``rewind``
  snapshots);
* ``lineage``: every lineage matrix the checkpoint holds (the live members', the baseline's,
  each snapshot's), kept apart so that `jaxunlearn audit` reads them without the parameters;
* ``plan``: the recorded samples of every stage (ragged id arrays as flat arrays + offsets);
* ``meta``: JSON: the run's position, random-generator states, deleted ids, results so far.

Only then does jaxunlearn write ``checkpoints/manifests/N.json``: the size and SHA-256 of
every file of the step, written to a temporary file, fsynced and renamed. A checkpoint is
*complete* when its manifest exists and every file matches it; anything else (a write killed
half-way, a truncated or corrupted file, a disk that filled up) is not, and `load_latest`
falls back to the newest complete one and says which it skipped and why.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
from typing import Callable

import numpy as np

from jaxunlearn import faults

ITEMS = ("state", "lineage", "plan", "meta")


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that cannot be written; the message says what to do."""


def _fsync_write(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(step_dir: pathlib.Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(step_dir)): (p.stat().st_size, _digest(p))
            for p in sorted(step_dir.rglob("*")) if p.is_file()}


def pack_ids(ids) -> np.ndarray:
    """A 1-D id array with a leading -1, so it is never empty (orbax refuses empty arrays)."""
    return np.concatenate([[-1], np.asarray(ids, np.int64)]).astype(np.int64)


def unpack_ids(packed) -> np.ndarray:
    return np.asarray(packed)[1:]


def pack_ragged(arrays: list[np.ndarray]) -> dict:
    """A list of 1-D int arrays as ``{"ids": flat, "offsets": [len + 1]}`` (`pack_ids`)."""
    lengths = [len(a) for a in arrays]
    flat = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
    return {"ids": pack_ids(flat),
            "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)}


def unpack_ragged(packed: dict) -> list[np.ndarray]:
    ids, offsets = unpack_ids(packed["ids"]), np.asarray(packed["offsets"])
    return [ids[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


class Checkpoints:
    """The checkpoints of one run folder (``run_dir/checkpoints``)."""

    def __init__(self, run_dir, read_only: bool = False):
        import orbax.checkpoint as ocp

        self.root = pathlib.Path(run_dir).resolve() / "checkpoints"  # orbax wants it absolute
        self.manifests = self.root / "manifests"
        if not read_only:
            self.manifests.mkdir(parents=True, exist_ok=True)
        self._ocp = ocp
        self._manager = None
        self.read_only = read_only

    @property
    def manager(self):
        if self._manager is None:
            ocp = self._ocp
            import jax

            # Readers do not set orbax's read_only (it only adds warnings); they never save.
            # Only the primary process of a multi-process run writes (host numpy arrays it
            # gathered), so orbax must not wait for the others at its barriers.
            multi = ocp.options.MultiprocessingOptions(
                primary_host=jax.process_index(), active_processes={jax.process_index()})
            options = ocp.CheckpointManagerOptions(
                max_to_keep=None, enable_async_checkpointing=False, create=False,
                multiprocessing_options=multi)
            self._manager = ocp.CheckpointManager(self.root, options=options, item_names=ITEMS)
        return self._manager

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
            self._manager = None

    # ---- writing -------------------------------------------------------------------------

    def save(self, step: int, state, lineage, plan, meta: dict) -> pathlib.Path:
        """Writes checkpoint ``step`` and then its manifest. Raises CheckpointError (with the
        cause) when the disk refuses; earlier checkpoints are untouched either way."""
        ocp = self._ocp
        step_dir = self.root / str(step)
        try:
            faults.point("checkpoint.before_write")
            if step_dir.exists():  # a leftover from a killed or damaged write of this step
                self.delete(step)
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), lineage=ocp.args.StandardSave(lineage),
                plan=ocp.args.StandardSave(plan), meta=ocp.args.JsonSave(meta)), force=True)
            self.manager.wait_until_finished()
            faults.point("checkpoint.before_manifest")
            manifest = {"step": step, "files": _files(step_dir)}
            _fsync_write(self.manifests / f"{step}.json", json.dumps(manifest))
        except OSError as e:
            raise CheckpointError(f"could not write checkpoint {step} in {self.root}: {e}; "
                                  f"the previous checkpoints are intact") from e
        return step_dir

    def delete(self, step: int) -> None:
        """Removes checkpoint ``step``: its manifest first (so it stops counting as complete),
        then its files."""
        manifest = self.manifests / f"{step}.json"
        if manifest.exists():
            manifest.unlink()
            _fsync_dir(self.manifests)
        step_dir = self.root / str(step)
        if step_dir.exists():
            shutil.rmtree(step_dir)
        self.close()  # the manager caches its step list

    def discard_incomplete(self) -> list[int]:
        """Deletes step folders without a manifest (writes that never finished); returns them."""
        gone = []
        for step in self._step_dirs():
            if not (self.manifests / f"{step}.json").exists():
                shutil.rmtree(self.root / str(step))
                gone.append(step)
        for tmp in self.root.glob("*.orbax-checkpoint-tmp*"):
            shutil.rmtree(tmp, ignore_errors=True)
        if gone:
            self.close()
        return gone

    # ---- reading -------------------------------------------------------------------------

    def _step_dirs(self) -> list[int]:
        if not self.root.exists():
            return []
        return sorted(int(p.name) for p in self.root.iterdir() if p.is_dir() and p.name.isdigit())

    def steps(self) -> list[int]:
        """Steps that have a manifest (complete unless damaged since), oldest first."""
        if not self.manifests.exists():
            return []
        return sorted(int(p.stem) for p in self.manifests.glob("*.json") if p.stem.isdigit())

    def verify(self, step: int) -> str | None:
        """None when checkpoint ``step`` matches its manifest, else what is wrong."""
        try:
            manifest = json.loads((self.manifests / f"{step}.json").read_text())
        except (OSError, ValueError) as e:
            return f"its manifest is unreadable ({e})"
        step_dir = self.root / str(step)
        if not step_dir.is_dir():
            return "its folder is missing"
        for name, (size, digest) in manifest["files"].items():
            path = step_dir / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} is {path.stat().st_size} bytes, {size} were written (truncated?)"
            if _digest(path) != digest:
                return f"{name} does not match its checksum (corrupted)"
        return None

    def load(self, step: int, items=ITEMS) -> dict:
        """Reads ``items`` of checkpoint ``step`` after verifying it; CheckpointError if it is
        damaged."""
        problem = self.verify(step)
        if problem:
            raise CheckpointError(f"checkpoint {step} is damaged: {problem}")
        ocp = self._ocp
        args = {name: (ocp.args.JsonRestore() if name == "meta" else ocp.args.StandardRestore())
                for name in items}
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # orbax/tensorstore raise many kinds on a bad file
            raise CheckpointError(f"checkpoint {step} cannot be read: {e}") from e
        return {name: restored[name] for name in items}

    def load_latest(self, log: Callable[[str], None], items=ITEMS) -> tuple[int, dict]:
        """The newest complete checkpoint, skipping (and reporting) damaged ones.
        Raises CheckpointError when none is usable."""
        skipped = []
        for step in reversed(self.steps()):
            try:
                loaded = self.load(step, items)
            except CheckpointError as e:
                skipped.append(str(e))
                log(f"warning: {e}; falling back to the previous checkpoint")
                continue
            self.damaged = [s for s in self.steps() if s > step]
            return step, loaded
        detail = "; ".join(skipped) if skipped else "none was written"
        raise CheckpointError(f"no usable checkpoint in {self.root} ({detail})")
