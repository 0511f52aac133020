"""Chunks and sampling plans: what each member trains on in each phase.

The training set is split **in order** into one chunk per phase; phase ``k`` (1-based) sees
the working set = chunks ``1..k`` minus deleted examples. Plans draw from a numpy `Generator`
owned by the driver, so a run is replayable from its seed.

* ``bootstrap`` (the original study): each member, each phase, draws ``fraction`` of the working
  set with replacement.
* ``subset``: each member, each phase, draws ``fraction`` of the new chunk without replacement.
"""

from __future__ import annotations

import math

import numpy as np

PLANS = ("bootstrap", "subset")


def make_chunks(n_train: int, phases: int) -> list[np.ndarray]:
    """Example ids ``0..n_train-1`` split in order into ``phases`` nearly equal chunks."""
    if phases < 1:
        raise ValueError(f"phases must be at least 1, got {phases}")
    if n_train < phases:
        raise ValueError(f"{n_train} training examples cannot fill {phases} phases")
    return np.array_split(np.arange(n_train, dtype=np.int64), phases)


def working_set(chunks: list[np.ndarray], phase: int, deleted: np.ndarray) -> np.ndarray:
    """Ids of chunks ``1..phase`` that are not deleted (``deleted``: bool ``[n_train]``)."""
    ids = np.concatenate(chunks[:phase])
    return ids[~deleted[ids]]


def sample_size(plan: str, fraction: float, chunks: list[np.ndarray], phase: int,
                deleted: np.ndarray) -> int:
    pool = _pool(plan, chunks, phase, deleted)
    return int(fraction * len(pool))


def _pool(plan: str, chunks, phase, deleted) -> np.ndarray:
    if plan == "bootstrap":
        return working_set(chunks, phase, deleted)
    if plan == "subset":
        chunk = chunks[phase - 1]
        return chunk[~deleted[chunk]]
    raise ValueError(f"unknown sampling plan {plan!r}; choose one of {PLANS}")


def draw_samples(rng: np.random.Generator, plan: str, fraction: float, members: int,
                 chunks: list[np.ndarray], phase: int, deleted: np.ndarray) -> np.ndarray:
    """Each member's sample for ``phase``: int64 ``[members, s]`` of example ids.

    Deleted examples are never drawn. Raises ValueError when the sample would be empty.
    """
    pool = _pool(plan, chunks, phase, deleted)
    size = int(fraction * len(pool))
    if size < 1:
        raise ValueError(
            f"plan {plan!r} with fraction {fraction} gives each member 0 of the {len(pool)} "
            f"examples available in phase {phase}; raise the fraction or use more data")
    if plan == "bootstrap":
        return rng.choice(pool, size=(members, size), replace=True)
    return np.stack([rng.choice(pool, size=size, replace=False) for _ in range(members)])


def steps_per_epoch(sample_size: int, batch_size: int) -> int:
    return math.ceil(sample_size / batch_size)


def epoch_batches(rng: np.random.Generator, samples: np.ndarray,
                  batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One epoch of shuffled batches for every member.

    Args:
      samples: int ``[m, s]`` each member's sample (repeats allowed, as in a bootstrap).
    Returns:
      ``idx`` int32 ``[steps, m, batch_size]`` and ``weight`` float32 of the same shape; the last
      batch is padded with weight-0 entries (id 0), so every step has one static shape and every
      drawn example is fed exactly once per epoch.
    """
    m, s = samples.shape
    steps = steps_per_epoch(s, batch_size)
    order = rng.permuted(samples, axis=1)
    idx = np.zeros((m, steps * batch_size), np.int32)
    weight = np.zeros((m, steps * batch_size), np.float32)
    idx[:, :s] = order
    weight[:, :s] = 1.0
    idx = idx.reshape(m, steps, batch_size).transpose(1, 0, 2)
    weight = weight.reshape(m, steps, batch_size).transpose(1, 0, 2)
    return np.ascontiguousarray(idx), np.ascontiguousarray(weight)
