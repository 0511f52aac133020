"""A model group: the ensemble, or the baseline as a group of one, on the device.

`compile_group` builds the jitted functions once per process and setting; `ModelGroup` holds a
group's stacked state, its lineage and its host random stream, and trains it epoch by epoch.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn import ensemble, plans, unlearn
from jaxunlearn.config import Config
from jaxunlearn.lineage import Lineage
from jaxunlearn.models import PRECISIONS, make_model
from jaxunlearn.train import make_optimizer


class Compiled(NamedTuple):
    """A model, its optimiser and their jitted ensemble functions (state buffers donated)."""

    model: Any
    tx: Any
    strategy: str
    init: Callable
    step: Callable
    logits: Callable
    unlearn: Callable
    reset_optimizer: Callable


@functools.lru_cache(maxsize=16)
def compile_group(arch: str, stem: str, precision: str, optimizer: str, learning_rate: float,
                  weight_decay: float, member_parallel: str, augment: bool) -> Compiled:
    """Builds (once per process and setting) the jitted functions of one model group, so that
    repeated runs in one process, as in sweeps and tests, reuse their compilations."""
    model = make_model(arch, stem, dtype=PRECISIONS[precision])
    tx = make_optimizer(optimizer, learning_rate, weight_decay)
    strategy = ensemble.resolve_strategy(member_parallel)
    return Compiled(
        model=model, tx=tx, strategy=strategy,
        init=jax.jit(functools.partial(ensemble.init_ensemble, model, tx), static_argnums=1),
        step=jax.jit(ensemble.make_train_step(model, tx, strategy, augment), donate_argnums=0),
        logits=jax.jit(ensemble.make_eval_logits(model, strategy)),
        unlearn=jax.jit(unlearn.make_unlearn(model, tx), donate_argnums=1),
        reset_optimizer=jax.jit(functools.partial(ensemble.reset_optimizer, tx), donate_argnums=0))


class ModelGroup:
    """One stacked group of members (the ensemble, or the baseline as a group of one), with its
    jitted steps, its lineage and its host random stream. Driver-side: it owns mutable state."""

    def __init__(self, name: str, arch: str, members: int, cfg: Config, key, n_train: int,
                 rng: np.random.Generator):
        self.name = name
        # A group of one (the baseline) needs no member parallelism: vmap over one member is
        # the plain model.
        parallel = cfg.member_parallel if members > 1 else "vmap"
        fns = compile_group(arch, cfg.stem, cfg.precision, cfg.optimizer, cfg.learning_rate,
                            cfg.weight_decay, parallel, cfg.augment)
        self.strategy = fns.strategy
        self.step, self.logits = fns.step, fns.logits
        self.unlearn, self.reset_optimizer = fns.unlearn, fns.reset_optimizer
        self.state = fns.init(key, members)
        self.lineage = Lineage.empty(members, n_train)
        self.rng = rng
        self.members = members

    def train(self, arrays, samples: np.ndarray, epochs: int, batch_size: int,
              active: np.ndarray, on_epoch: Callable[[int, np.ndarray], None]) -> None:
        """Trains the ``active`` members for ``epochs`` on their ``samples`` (int ``[m, s]``)."""
        images, labels = arrays
        active_dev = jnp.asarray(active)
        for epoch in range(1, epochs + 1):
            idx, weight = plans.epoch_batches(self.rng, samples, batch_size)
            idx_dev, weight_dev = jnp.asarray(idx), jnp.asarray(weight)
            loss_sum = jnp.zeros(self.members, jnp.float32)
            for s in range(idx.shape[0]):
                self.state, loss = self.step(self.state, images, labels, idx_dev[s],
                                             weight_dev[s], active_dev)
                loss_sum = loss_sum + loss
            self.lineage.record(idx, weight, active)
            check_finite(np.asarray(loss_sum), self.name, epoch)
            on_epoch(epoch, np.asarray(loss_sum) / samples.shape[1])

    def member_logits(self, images, n: int, batch_size: int) -> np.ndarray:
        """Logits of every member on the first ``n`` resident images: ``[m, n, classes]``."""
        out = []
        for start in range(0, n, batch_size):
            idx = np.arange(start, start + batch_size) % n  # pad the last batch by wrapping
            out.append(np.asarray(self.logits(self.state, images, jnp.asarray(idx, jnp.int32))))
        return np.concatenate(out, axis=1)[:, :n]


def check_finite(loss_sums: np.ndarray, name: str, epoch: int) -> None:
    bad = np.flatnonzero(~np.isfinite(loss_sums))
    if bad.size:
        raise FloatingPointError(f"{name} member(s) {bad.tolist()} reached a non-finite loss in "
                                 f"epoch {epoch}; lower the learning rate")


