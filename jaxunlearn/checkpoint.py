"""Checkpoints of a run, with orbax-checkpoint, that are complete or ignored, never half-read.

A checkpoint is one tree: every component of the run hands over its state as a nested dict
whose leaves are numpy arrays or JSON values (`jaxunlearn.durable`). A run folder keeps its
checkpoints in ``checkpoints/``: orbax writes step ``N`` as the folder ``checkpoints/N`` (into
a temporary folder first, renamed when committed) with two items:

* ``arrays``: the tree's arrays (model states, lineages, recorded samples), by their paths;
* ``meta``: JSON: the format version, the rest of the tree (with a marker where an array is),
  and an index of the lineage matrices the checkpoint holds, so that `jaxunlearn audit` reads
  them without the parameters.

Only then does jaxunlearn write ``checkpoints/manifests/N.json``: the size and SHA-256 of
every file of the step, written to a temporary file, fsynced and renamed. A checkpoint is
*complete* when its manifest exists and every file matches it; anything else (a write killed
half-way, a truncated or corrupted file, a disk that filled up) is not, and `load_latest`
falls back to the newest complete one and says which it skipped and why. A checkpoint of
another format version (an older jaxunlearn) is refused with a message, never misread.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
from typing import Callable

import numpy as np

from jaxunlearn import faults
from jaxunlearn.files import atomic_write, fsync_dir
from jaxunlearn.folder import RunFolder

ITEMS = ("arrays", "meta")
FORMAT = 2
_ARRAY = "__array__"  # marks where the meta tree has an array


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that cannot be written; the message says what to do."""


def _digest(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(step_dir: pathlib.Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(step_dir)): (p.stat().st_size, _digest(p))
            for p in sorted(step_dir.rglob("*")) if p.is_file()}


class CheckpointFormatError(CheckpointError):
    """A checkpoint written in another format version than this jaxunlearn reads."""


def split(tree) -> tuple[dict, object]:
    """A state tree (nested dicts; numpy arrays and JSON values as leaves) as ``(arrays,
    rest)``: the non-empty arrays by path, and the tree with a marker where each was."""
    if isinstance(tree, dict):
        arrays, rest = {}, {}
        for key, value in tree.items():
            sub_arrays, rest[str(key)] = split(value)
            if sub_arrays is not None and (not isinstance(sub_arrays, dict) or sub_arrays):
                arrays[str(key)] = sub_arrays
        return arrays, rest
    if isinstance(tree, np.ndarray) and tree.size:  # orbax refuses empty arrays
        return tree, {_ARRAY: True}
    if isinstance(tree, np.ndarray):
        return None, {_ARRAY: False, "dtype": tree.dtype.str, "shape": list(tree.shape)}
    return None, tree


def merge(arrays, rest):
    """The inverse of `split`."""
    if isinstance(rest, dict) and _ARRAY in rest:
        return (np.asarray(arrays) if rest[_ARRAY]
                else np.zeros(rest["shape"], np.dtype(rest["dtype"])))
    if isinstance(rest, dict):
        return {key: merge(arrays.get(key) if isinstance(arrays, dict) else None, value)
                for key, value in rest.items()}
    return rest


def _placeholders(paths: list[list[str]]) -> dict:
    target: dict = {}
    for path in paths:
        node = target
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.zeros(0)  # shape and dtype come from the checkpoint
    return target


class Checkpoints:
    """The checkpoints of one run folder (``run_dir/checkpoints``)."""

    def __init__(self, run_dir, read_only: bool = False):
        import orbax.checkpoint as ocp

        self.root = RunFolder(run_dir).checkpoints
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

    def save(self, step: int, tree: dict, lineages: list[dict]) -> pathlib.Path:
        """Writes checkpoint ``step`` of the state ``tree`` and then its manifest; ``lineages``
        indexes its lineage matrices (``{"where", "group", "path"}``). Raises CheckpointError
        (with the cause) when the disk refuses; earlier checkpoints are untouched either way."""
        ocp = self._ocp
        step_dir = self.root / str(step)
        arrays, rest = split(tree)
        meta = {"format": FORMAT, "tree": rest, "lineages": lineages}
        try:
            faults.point("checkpoint.before_write")
            if step_dir.exists():  # a leftover from a killed or damaged write of this step
                self.delete(step)
            self.manager.save(step, args=ocp.args.Composite(
                arrays=ocp.args.PyTreeSave(arrays), meta=ocp.args.JsonSave(meta)), force=True)
            self.manager.wait_until_finished()
            faults.point("checkpoint.before_manifest")
            manifest = {"step": step, "files": _files(step_dir)}
            atomic_write(self.manifests / f"{step}.json", json.dumps(manifest))
        except Exception as e:  # OSError, and orbax/tensorstore's ValueErrors on a full disk
            raise CheckpointError(f"could not write checkpoint {step} in {self.root}: {e}; "
                                  f"the previous checkpoints are intact") from e
        return step_dir

    def delete(self, step: int) -> None:
        """Removes checkpoint ``step``: its manifest first (so it stops counting as complete),
        then its files."""
        manifest = self.manifests / f"{step}.json"
        if manifest.exists():
            manifest.unlink()
            fsync_dir(self.manifests)
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

    def _restore(self, step: int, **args):
        problem = self.verify(step)
        if problem:
            raise CheckpointError(f"checkpoint {step} is damaged: {problem}")
        try:
            return self.manager.restore(step, args=self._ocp.args.Composite(**args))
        except Exception as e:  # orbax/tensorstore raise many kinds on a bad file
            raise CheckpointError(f"checkpoint {step} cannot be read: {e}") from e

    def load_meta(self, step: int) -> dict:
        """The JSON part of checkpoint ``step`` (verified first): ``format``, ``tree`` (arrays
        marked, not read) and ``lineages``. CheckpointError if it is damaged,
        CheckpointFormatError if another version of jaxunlearn wrote it."""
        meta = self._restore(step, meta=self._ocp.args.JsonRestore())["meta"]
        if meta.get("format") != FORMAT:
            raise CheckpointFormatError(
                f"checkpoint {step} in {self.root} has format {meta.get('format')}, and this "
                f"jaxunlearn reads format {FORMAT} only: the run was written by another version "
                f"(0.1 wrote format 1); resume, audit or forget it with that version, or "
                f"start a new run")
        return meta

    def load(self, step: int) -> tuple[dict, dict]:
        """Checkpoint ``step`` as ``(tree, meta)``, verified first (see `load_meta`)."""
        meta = self.load_meta(step)
        arrays = self._restore(step, arrays=self._ocp.args.PyTreeRestore())["arrays"]
        return merge(arrays, meta["tree"]), meta

    def load_lineages(self, step: int) -> tuple[dict[str, np.ndarray], dict]:
        """Only the lineage matrices of checkpoint ``step``, as ``({where: bool [m, n]},
        meta)``; the parameters are not read."""
        meta = self.load_meta(step)
        paths = [entry["path"] for entry in meta["lineages"]]
        restored = self._restore(step, arrays=self._ocp.args.PyTreeRestore(
            item=_placeholders(paths), partial_restore=True))["arrays"]
        out = {}
        for entry in meta["lineages"]:
            node = restored
            for key in entry["path"]:
                node = node[key]
            out[entry["where"]] = np.asarray(node)
        return out, meta

    def load_latest(self, log: Callable[[str], None]) -> tuple[int, dict, dict]:
        """The newest complete checkpoint as ``(step, tree, meta)``, skipping (and reporting)
        damaged ones. Raises CheckpointError when none is usable, CheckpointFormatError at once
        for another format."""
        skipped = []
        for step in reversed(self.steps()):
            try:
                tree, meta = self.load(step)
            except CheckpointFormatError:
                raise
            except CheckpointError as e:
                skipped.append(str(e))
                log(f"warning: {e}; falling back to the previous checkpoint")
                continue
            self.damaged = [s for s in self.steps() if s > step]
            return step, tree, meta
        detail = "; ".join(skipped) if skipped else "none was written"
        raise CheckpointError(f"no usable checkpoint in {self.root} ({detail})")
