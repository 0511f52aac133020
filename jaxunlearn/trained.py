"""A trained run as an object: `load(run_dir)` returns a read-only view of its newest complete
checkpoint that predicts on new inputs, exports its members' parameters as plain Flax variables
and reads its results, without taking the run's lock and without printing anything.

Usage::

    run = jaxunlearn.load("runs/demo-...")
    probs = run.predict(images)                   # [n, classes], the run's aggregation and TTA
    each = run.predict(images, per_member=True)   # [members, n, classes]
    variables = run.variables(member=0)           # {"params": ..., "batch_stats": ...}
    logits = run.module().apply(variables, run.preprocess(images), train=False)
    run.forget([12, 345])                         # takes the lock, like `jaxunlearn forget`

The view holds the state it read: a process that changes the run afterwards (a `forget`, a
resumed training) is seen after `reload` (its own `forget` and `audit` reload it).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn import auditing, checkpoint, data, metrics, records, runlock, steps
from jaxunlearn.config import Config
from jaxunlearn.folder import RunFolder
from jaxunlearn.group import group_functions
from jaxunlearn.results import Report
from jaxunlearn.run import saved_config

GROUPS = ("ensemble", "baseline")


class PredictError(ValueError):
    """Inputs a run cannot predict on; the message says what it expects."""


@dataclasses.dataclass(frozen=True)
class _Group:
    """One trained group's stacked state (host arrays), its compiled functions and voters."""

    state: Any  # stacked `jaxunlearn.steps.MemberState` of numpy arrays
    fns: Any  # `jaxunlearn.group.Compiled`
    voters: np.ndarray  # bool [m]: the members whose predictions count


class TrainedRun:
    """A read-only view of a trained run (see the module docstring); made by `load`."""

    def __init__(self, run_dir, dataset=None):
        self.path = runlock.check_run_dir(run_dir)
        self._dataset = dataset
        self.reload()

    def reload(self) -> "TrainedRun":
        """Reads the run's newest complete checkpoint again (after another process changed
        it); returns the view."""
        self.config: Config = saved_config(self.path)
        ckpts = checkpoint.Checkpoints(self.path, read_only=True)
        try:
            self.checkpoint, tree, _ = ckpts.load_latest(lambda line: None)
        finally:
            ckpts.close()
        # What the members were trained on besides the examples (none recorded: CIFAR-10's).
        spec = Report.results_in(tree).get("data", data.CIFAR10_SPEC)
        self.input_shape = tuple(int(d) for d in spec["input_shape"])
        self.input_dtype = np.dtype(spec["dtype"])
        self.classes = int(spec["classes"])
        self.stats = (tuple(spec["mean"]), tuple(spec["std"]))
        self._groups = {name: self._group(name, saved)
                        for name, saved in tree["groups"].items()}
        return self

    def _group(self, name: str, saved: dict) -> _Group:
        cfg = self.config
        arch = cfg.model if name == "ensemble" else cfg.baseline
        members = cfg.members + cfg.shadow_members if name == "ensemble" else 1
        fns = group_functions(cfg, arch, members, input_shape=self.input_shape,
                              classes=self.classes, stats=self.stats)
        shape = jax.eval_shape(fns.init, jax.random.PRNGKey(0), members)
        state = flax.serialization.from_state_dict(shape, saved["state"])
        state = jax.tree.map(np.asarray, state)
        voters = (np.arange(members) < cfg.members) if name == "ensemble" else np.ones(1, bool)
        return _Group(state, fns, voters)

    # ---- what it holds ---------------------------------------------------------------------

    @property
    def results(self) -> records.Results:
        """The run's ``results.json`` (`jaxunlearn.records.Results`): its header, phases,
        requests and, once complete, its end state."""
        return records.load(RunFolder(self.path).results)

    @property
    def groups(self) -> tuple[str, ...]:
        """The trained groups: ``ensemble``, and ``baseline`` when the run has one."""
        return tuple(self._groups)

    def members(self, group: str = "ensemble") -> int:
        """How many members ``group`` stacks (shadow members included)."""
        return int(self._get(group).voters.shape[0])

    def module(self, group: str = "ensemble"):
        """The Flax module every member of ``group`` is an instance of (apply it to
        `preprocess`'d inputs with `variables`)."""
        return self._get(group).fns.model

    def variables(self, member: int | None = None, group: str = "ensemble") -> dict:
        """Plain Flax variables of ``group``: ``{"params", "batch_stats"}`` of one ``member``
        (numpy arrays), or the whole stack (member axis first) when ``member`` is None."""
        state = self._get(group).state
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        if member is None:
            return variables
        m = self.members(group)
        if not 0 <= member < m:
            raise IndexError(f"{group} has members 0..{m - 1}, got {member}")
        return jax.tree.map(lambda x: x[member], variables)

    def preprocess(self, inputs) -> jax.Array:
        """``inputs`` as the members see them: checked, then normalised as the run's training
        data was (`jaxunlearn.steps.normalize`)."""
        return steps.normalize(jnp.asarray(self._check(inputs)), self.stats)

    # ---- prediction ------------------------------------------------------------------------

    def predict(self, inputs, *, per_member: bool = False, group: str = "ensemble",
                batch_size: int | None = None) -> np.ndarray:
        """Class probabilities on ``inputs`` (shaped and typed as the run's training data, e.g.
        uint8 ``[n, 32, 32, 3]`` for CIFAR-10 images): ``[n, classes]`` combined by the run's
        ``aggregation`` over the members that predict, with the run's test-time augmentation:
        ``mean_logits``, the softmax of the mean logits; ``mean_probs``, the mean of the
        members' softmaxes; ``vote``, each class's share of the members' votes, ties broken
        by the mean softmax as the run's scores break them (its argmax is the vote). With
        ``per_member``, each stacked member's own softmax ``[m, n, classes]`` (shadow members
        included: rows ``cfg.members`` on)."""
        g = self._get(group)
        logits = self._logits(g, self._check(inputs), batch_size or self.config.eval_batch_size)
        if per_member:
            return np.exp(metrics.log_softmax(logits)).astype(np.float32)
        method = self.config.aggregation if g.voters.size > 1 else "mean_logits"
        probs = np.exp(metrics.ensemble_log_probs(logits, g.voters, method))
        if method == "vote":  # as `jaxunlearn.metrics.aggregate` decides
            votes = np.eye(self.classes)[logits[g.voters].argmax(axis=-1)].sum(axis=0)
            shares = votes + probs * 1e-3
            probs = shares / shares.sum(axis=-1, keepdims=True)
        return probs.astype(np.float32)

    def _logits(self, g: _Group, x: np.ndarray, batch_size: int) -> np.ndarray:
        n = len(x)
        batch = min(batch_size, max(8, 1 << max(n - 1, 0).bit_length()))
        state = jax.tree.map(jnp.asarray, g.state)
        idx = jnp.arange(batch, dtype=jnp.int32)
        out = []
        for start in range(0, n, batch):
            chunk = x[start:start + batch]
            pad = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])
            out.append(np.asarray(g.fns.logits(state, jnp.asarray(pad), idx))[:, :len(chunk)])
        if not out:
            return np.zeros((g.voters.size, 0, self.classes), np.float32)
        return np.concatenate(out, axis=1)

    def _check(self, inputs) -> np.ndarray:
        x = np.asarray(inputs)
        expected = self.input_shape
        if x.ndim != 1 + len(expected) or x.shape[1:] != expected:
            raise PredictError(f"inputs must be [n, {', '.join(map(str, expected))}] like the "
                               f"run's training data, got shape {x.shape}")
        if self.input_dtype == np.uint8 and x.dtype != np.uint8:
            raise PredictError(f"inputs must be uint8 like the run's training data, got "
                               f"{x.dtype}; pass the images as they were given to the run")
        if self.input_dtype != np.uint8:
            if not np.issubdtype(x.dtype, np.floating):
                raise PredictError(f"inputs must be floating point like the run's training "
                                   f"data ({self.input_dtype}), got {x.dtype}")
            x = x.astype(self.input_dtype)
        return x

    def _get(self, group: str) -> _Group:
        if group not in self._groups:
            raise ValueError(f"the run has no group {group!r}; it has {', '.join(self._groups)}")
        return self._groups[group]

    # ---- what changes the run (these take its lock) -----------------------------------------

    def forget(self, ids, *, wait: float = 600.0, log: Callable[[str], None] = print) -> dict:
        """Records and applies a deletion request of ``ids`` (`jaxunlearn.forget`, with the
        dataset the view was loaded with), then reads the run again."""
        from jaxunlearn.forgetting import forget

        outcome = forget(self.path, [int(i) for i in ids], log=log, wait=wait,
                         dataset=self._dataset)
        self.reload()
        return outcome

    def audit(self) -> tuple[bool, list[str], str]:
        """`jaxunlearn.auditing` of the run: ``(ok, problems then notes, summary)``."""
        outcome = auditing.audit(self.path)
        self.reload()
        return outcome

    def __repr__(self) -> str:
        arch = {"ensemble": self.config.model, "baseline": self.config.baseline}
        groups = ", ".join(f"{n}: {self.members(n)} x {arch[n]}" for n in self._groups)
        return f"TrainedRun({str(self.path)!r}, checkpoint {self.checkpoint}, {groups})"


def load(run_dir, dataset=None) -> TrainedRun:
    """A read-only view of the run in ``run_dir`` at its newest complete checkpoint (no lock
    taken, nothing printed). ``dataset``: the run's data when it was passed in memory (its
    `TrainedRun.forget` needs it). Raises ConfigError for a folder that is not a run,
    CheckpointError when no checkpoint can be read."""
    return TrainedRun(pathlib.Path(run_dir), dataset)
