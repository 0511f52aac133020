"""Chunks and sampling plans: what each member trains on in each phase.

The training set is split **in order** into one chunk per phase; phase ``k`` (1-based) sees
the working set = chunks ``1..k`` minus deleted examples. Plans draw from a numpy `Generator`
owned by the driver, so a run is replayable from its seed.

* ``bootstrap`` (the original study): each member, each phase, draws ``fraction`` of the working
  set with replacement.
* ``subset``: each member, each phase, draws ``fraction`` of the new chunk without replacement.
* ``shards`` (SISA): each chunk is split at random into ``members`` disjoint shards, one per
  member, which cover it; in phase ``k`` a member trains on its shards of chunks ``1..k`` (minus
  deleted ids). With ``slices`` S > 1 a member's shard of each new chunk is cut into S slices
  that it takes in S stages (slices ``1..r`` in stage ``r``), each a point it can be rewound to.

Samples are *ragged*: a list with one 1-D id array per member (a member's sample shrinks when
ids are deleted from it). Each member's batch order comes from its own generator, so a member
retrained alone (`rewind`, `oracle`) sees exactly the batches it would have seen in the run.
"""

from __future__ import annotations

import math

import numpy as np

from jaxunlearn.config import choices

PLANS = choices("plan")  # as the setting declares them
# Independent host random streams of a run, so that changing one part of it (say, evaluation)
# never shifts the samples another part draws.
STREAMS = ("ensemble", "baseline", "deletions", "retrain", "shards", "eval", "random_labels")


def stream(seed: int, name: str, *more: int) -> np.random.Generator:
    """The run's random stream ``name`` (one of `STREAMS`), optionally split further by
    ``more`` (e.g. a phase)."""
    return np.random.default_rng([seed, STREAMS.index(name), *more])


def make_chunks(n_train: int, phases: int, pretrain: int = 0) -> list[np.ndarray]:
    """Example ids ``0..n_train-1`` split in order into ``phases`` nearly equal chunks, but for
    the last ``pretrain`` (`pretraining_ids`: never deletable, in no chunk)."""
    if phases < 1:
        raise ValueError(f"phases must be at least 1, got {phases}")
    deletable = n_train - pretrain
    if deletable < phases:
        raise ValueError(f"{deletable} deletable training examples cannot fill {phases} "
                         f"phases")
    return np.array_split(np.arange(deletable, dtype=np.int64), phases)


def pretraining_ids(n_train: int, pretrain: int) -> np.ndarray:
    """The ids declared never deletable (``pretrain``, the last of the ``n_train``): they only
    pretrain the members' initialisation, outside every chunk."""
    return np.arange(n_train - pretrain, n_train, dtype=np.int64)


def working_set(chunks: list[np.ndarray], phase: int, deleted: np.ndarray) -> np.ndarray:
    """Ids of chunks ``1..phase`` that are not deleted (``deleted``: bool ``[n_train]``)."""
    ids = np.concatenate(chunks[:phase])
    return ids[~deleted[ids]]


def sample_size(plan: str, fraction: float, chunks: list[np.ndarray], phase: int,
                deleted: np.ndarray, members: int = 1, slices: int = 1) -> int:
    """The (smallest) number of examples a member trains on in ``phase``."""
    if plan == "shards":
        # The smallest shard of the new chunk's first slice bounds the first stage's sample.
        first = sum(len(c) // members for c in chunks[:phase - 1])
        return first + len(chunks[phase - 1]) // members // slices
    return int(fraction * len(pool(plan, chunks, phase, deleted)))


def pool(plan: str, chunks, phase, deleted) -> np.ndarray:
    """The ids a ``bootstrap`` or ``subset`` member draws from in ``phase``."""
    if plan == "bootstrap":
        return working_set(chunks, phase, deleted)
    if plan == "subset":
        chunk = chunks[phase - 1]
        return chunk[~deleted[chunk]]
    if plan == "shards":
        raise ValueError("plan 'shards' assigns shards with make_shards, it does not draw")
    raise ValueError(f"unknown sampling plan {plan!r}; choose one of {PLANS}")


def draw_samples(rng: np.random.Generator, plan: str, fraction: float, members: int,
                 chunks: list[np.ndarray], phase: int, deleted: np.ndarray) -> np.ndarray:
    """Each member's sample for ``phase``: int64 ``[members, s]`` of example ids.

    Deleted examples are never drawn. Raises ValueError when the sample would be empty.
    """
    ids = pool(plan, chunks, phase, deleted)
    size = int(fraction * len(ids))
    if size < 1:
        raise ValueError(
            f"plan {plan!r} with fraction {fraction} gives each member 0 of the {len(ids)} "
            f"examples available in phase {phase}; raise the fraction or use more data")
    if plan == "bootstrap":
        return rng.choice(ids, size=(members, size), replace=True)
    return np.stack([rng.choice(ids, size=size, replace=False) for _ in range(members)])


def steps_per_epoch(sample_size: int, batch_size: int) -> int:
    return math.ceil(sample_size / batch_size)


def make_shards(rng: np.random.Generator, chunks: list[np.ndarray], members: int,
                slices: int = 1) -> list[list[list[np.ndarray]]]:
    """``shards[phase - 1][member][slice]``: each chunk permuted by ``rng`` and split into
    ``members`` disjoint near-equal shards that cover it, each cut into ``slices`` slices."""
    out = []
    for chunk in chunks:
        parts = np.array_split(rng.permutation(chunk), members)
        out.append([np.array_split(part, slices) for part in parts])
    return out


def shard_samples(shards, phase: int, slice_: int, deleted: np.ndarray) -> list[np.ndarray]:
    """Each member's sample at stage (``phase``, ``slice_``), both 1-based: its whole shards of
    the earlier chunks plus slices ``1..slice_`` of its shard of chunk ``phase``, minus
    deleted ids."""
    samples = []
    for member in range(len(shards[0])):
        parts = [p for q in range(phase - 1) for p in shards[q][member]]
        parts += shards[phase - 1][member][:slice_]
        ids = np.concatenate(parts)
        samples.append(ids[~deleted[ids]])
    return samples


def without(samples, deleted: np.ndarray) -> list[np.ndarray]:
    """``samples`` (ragged, or ``[m, s]``) with the ``deleted`` ids (bool ``[n]``) removed."""
    return [np.asarray(s)[~deleted[np.asarray(s)]] for s in samples]


def member_rngs(seed_key: tuple[int, ...], epoch: int, members: int) -> list[np.random.Generator]:
    """One generator per member for one epoch, a pure function of (``seed_key``, epoch, member)."""
    return [np.random.default_rng([*seed_key, epoch, i]) for i in range(members)]


def epoch_batches(rngs: list[np.random.Generator], samples,
                  batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One epoch of shuffled batches for every member.

    Args:
      rngs: one generator per member (`member_rngs`); member ``i``'s order depends only on
        ``rngs[i]`` and its own sample.
      samples: each member's sample: a list of 1-D id arrays (ragged; repeats allowed, as in a
        bootstrap), or int ``[m, s]``.
    Returns:
      ``idx`` int32 ``[steps, m, batch_size]`` and ``weight`` float32 of the same shape, with
      ``steps`` set by the longest sample; short samples and the last batch are padded with
      weight-0 entries (id 0), so every step has one static shape and every drawn example is fed
      exactly once per epoch. A member with only padding in a step is left unchanged by it.
    """
    m = len(samples)
    longest = max((len(s) for s in samples), default=0)
    steps = max(steps_per_epoch(longest, batch_size), 1)
    idx = np.zeros((m, steps * batch_size), np.int32)
    weight = np.zeros((m, steps * batch_size), np.float32)
    for i, (rng, sample) in enumerate(zip(rngs, samples)):
        n = len(sample)
        idx[i, :n] = rng.permutation(np.asarray(sample))
        weight[i, :n] = 1.0
    idx = idx.reshape(m, steps, batch_size).transpose(1, 0, 2)
    weight = weight.reshape(m, steps, batch_size).transpose(1, 0, 2)
    return np.ascontiguousarray(idx), np.ascontiguousarray(weight)


def avoid_probability(plan: str, pool: np.ndarray | None, sample: np.ndarray,
                      ids: np.ndarray) -> float:
    """The probability that one member's draw of ``len(sample)`` examples (from ``pool``, under
    ``plan``) holds none of ``ids``; for the deterministic plans (``shards``, ``full``) it is 0
    or 1 from the sample itself."""
    if pool is None:
        return 0.0 if np.isin(ids, sample).any() else 1.0
    hits, n, s = int(np.isin(pool, ids).sum()), len(pool), len(sample)
    if plan == "bootstrap":  # s independent uniform draws
        return (1.0 - hits / n) ** s
    if n - hits < s:  # subset: s draws without replacement
        return 0.0
    j = np.arange(s)
    return float(np.prod((n - hits - j) / (n - j)))
