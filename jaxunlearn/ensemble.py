"""The stacked ensemble: one `MemberState` pytree with the member axis first on every leaf.

Member-parallel execution (the *layout*: the ``member_parallel`` setting, not to be confused
with the unlearning strategy) is chosen, not a hard-coded `vmap`:

* ``vmap``: `jax.vmap` over members. Every convolution becomes one grouped convolution.
* ``map``: `jax.lax.map` (a scan) over members inside the same jit: M dense convolutions one
  after another. Measured ~2x faster than ``vmap`` on an H100 for ResNets, because XLA's
  grouped convolutions are slow there.
* ``unroll``: the members as M separate dense computations in the same jit (a Python loop over
  member slices). It compiles M copies of the member; on a CPU it runs a small CIFAR net ~5x
  faster than ``vmap``, whose grouped convolutions lose XLA:CPU's fast path there.
* ``hybrid:K``: vmap over groups of K members, map over the groups.

All run the same pure single-member step on the same stacked state, so they are
interchangeable and give the same result up to floating-point reassociation; ``unroll`` and
``map`` compute each member as it would be computed alone, so their results do not depend on
how many members share the stack. ``auto`` takes the measured fastest per backend,
architecture, stem and member count (`MEASURED_LAYOUTS`). The functions returned here are not
jitted: the driver jits them (with donated state).

Training some members only (a retraining after a deletion) runs them as a smaller stack:
`substacks` cuts the members into stacks of a few bounded sizes, so a group compiles a bounded
number of variants of its step.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxunlearn import steps
from jaxunlearn.config import choices
from jaxunlearn.steps import MemberState, PRNGKey

LAYOUTS = ("vmap", "map", "unroll")
# `auto`, from measurements (benchmarks/README.md, benchmarks/results/layouts_*.json):
# (backend, architecture, stem) -> [(up to this many members or None, layout), ...]. A pair
# without an entry takes its architecture's first entry on the backend, then its family's
# measured member's (air-s for the air nets, ResNet-18 for the ResNets) for the stem.
MEASURED_LAYOUTS = {
    ("cpu", "air-s", "cifar"): [(None, "unroll")],
    ("cpu", "tiny", "cifar"): [(None, "unroll")],
    ("cpu", "tiny", "imagenet"): [(None, "unroll")],
    ("cpu", "resnet18", "imagenet"): [(None, "vmap")],
    ("cpu", "resnet18", "cifar"): [(None, "unroll")],
    ("gpu", "resnet18", "imagenet"): [(None, "map")],
    ("gpu", "resnet18", "cifar"): [(None, "map")],
}
# How each layout cuts a partial stack (`substacks`), from benchmarks/retrain_cost.py.
SUBSTACK_POLICY = {"vmap": "pow2", "map": "pow2", "unroll": "ones"}
SUBSTACK_POLICIES = tuple(p for p in choices("substacks") if p != "auto")


def resolve_layout(name: str, backend: str | None = None, arch: str = "resnet18",
                   stem: str = "imagenet", members: int = 5) -> str:
    """``auto`` -> the measured layout for ``backend`` (default: JAX's), ``arch``, ``stem`` and
    ``members``; other names are checked and returned.

    Names: ``vmap``, ``map``, ``unroll``, or ``hybrid:K`` (vmap over groups of K members, map
    over the groups; the member count must be a multiple of K).
    """
    if name == "auto":
        backend = backend or jax.default_backend()
        family = "air-s" if arch.startswith("air") else "resnet18"
        rules = (MEASURED_LAYOUTS.get((backend, arch, stem))
                 or next((v for (b, a, _), v in MEASURED_LAYOUTS.items()
                          if (b, a) == (backend, arch)), None)
                 or MEASURED_LAYOUTS.get((backend, family, stem))
                 or next((v for (b, a, _), v in MEASURED_LAYOUTS.items()
                          if (b, a) == (backend, family)), None)
                 or [(None, "vmap")])
        return next(layout for limit, layout in rules if limit is None or members <= limit)
    if name in LAYOUTS or hybrid_group_size(name):
        return name
    raise ValueError(f"unknown member_parallel layout {name!r}; choose auto, vmap, map, "
                     "unroll or hybrid:K (K members per vmapped group)")


def substacks(members: np.ndarray, multiple: int = 1, policy: str = "pow2") -> list[np.ndarray]:
    """Cuts the ``members`` (bool ``[m]``) to train into stacks of member indices.

    Every stack's size is a multiple of ``multiple`` (the device count: a stack shards over the
    devices); a stack that the chosen members do not fill is padded with other members, which
    the caller keeps inactive. Sizes by ``policy``: ``pow2``, the chosen count (in units of
    ``multiple``) as a sum of distinct powers of two (3 -> 2 + 1), so at most log2(m) + 1 sizes
    ever compile and only the last stack is padded, by less than ``multiple``; ``ones``, stacks
    of one unit; ``exact``, one stack of the rounded-up count (up to m sizes may compile);
    ``full``, the whole group (no sub-stack: the others computed and discarded). With every
    member chosen: one stack of all.
    """
    members = np.asarray(members, bool)
    m, chosen = len(members), np.flatnonzero(members)
    if policy not in SUBSTACK_POLICIES:
        raise ValueError(f"unknown sub-stack policy {policy!r}; choose one of "
                         f"{', '.join(SUBSTACK_POLICIES)}")
    if not chosen.size:
        return []
    if members.all() or policy == "full":
        return [np.arange(m, dtype=np.int32)]
    units = -(-len(chosen) // multiple)
    if units * multiple >= m:  # padded to the whole group: the group itself, in order
        return [np.arange(m, dtype=np.int32)]
    if policy == "pow2":
        sizes = [1 << b for b in reversed(range(units.bit_length())) if units >> b & 1]
    elif policy == "ones":
        sizes = [1] * units
    else:
        sizes = [units]
    others, out, start = np.flatnonzero(~members), [], 0
    for size in sizes:
        take = chosen[start:start + size * multiple]
        start += len(take)
        pad = size * multiple - len(take)
        out.append(np.concatenate([take, others[:pad]]).astype(np.int32))
    return out


def hybrid_group_size(layout: str) -> int | None:
    """K for a well-formed ``hybrid:K`` (K >= 1), else None."""
    kind, _, k = layout.partition(":")
    return int(k) if kind == "hybrid" and k.isdigit() and int(k) >= 1 else None


def over_members(layout: str, fn: Callable, per_member, *shared):
    """Applies ``fn(member_args..., *shared)`` to every member.

    ``per_member`` is a tuple of pytrees whose leaves have the member axis first; ``shared``
    arguments are the same for every member (for example the resident dataset).
    """
    def vmapped(args):
        return jax.vmap(lambda *a: fn(*a, *shared))(*args)

    m = jax.tree.leaves(per_member)[0].shape[0]
    if layout == "vmap":
        return vmapped(per_member)
    if layout == "map":
        return jax.lax.map(lambda a: fn(*a, *shared), per_member)
    if layout == "unroll":  # M dense programs in one jit
        outs = [fn(*jax.tree.map(lambda x, i=i: x[i], per_member), *shared) for i in range(m)]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    k = hybrid_group_size(layout)
    if k:
        if m % k:
            raise ValueError(f"member_parallel={layout} needs a member count divisible by {k}, "
                             f"got {m}; choose K dividing {m}")
        grouped = jax.tree.map(lambda x: x.reshape((m // k, k) + x.shape[1:]), per_member)
        out = jax.lax.map(vmapped, grouped)
        return jax.tree.map(lambda x: x.reshape((m,) + x.shape[2:]), out)
    raise ValueError(f"unknown member_parallel layout {layout!r}")


def init_ensemble(model: nn.Module, tx: optax.GradientTransformation, key: PRNGKey,
                  members: int, input_shape: tuple = (32, 32, 3)) -> MemberState:
    """Initialises ``members`` members by vmapping the single-member init over split keys
    (``input_shape``: one example's shape)."""
    if members < 1:
        raise ValueError(f"an ensemble needs at least one member, got {members}")
    keys = jax.random.split(key, members)
    return jax.vmap(functools.partial(steps.init_member, model, tx,
                                      input_shape=input_shape))(keys)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, layout: str,
                    use_augment: bool = False, label_smoothing: float = 0.0,
                    stats: steps.Stats = steps.CIFAR10_STATS,
                    make_tx: Callable | None = None) -> Callable:
    """Returns ``step(state, images, labels, idx, weight, active, lr_scale=None, aux=None,
    hyper=None, *, hook=None) -> (state, loss_sums)``.

    ``make_tx(**settings)``: the optimiser of one member from its own settings; the step then
    needs ``hyper``, a dict of float32 ``[m]`` arrays (each member's ``learning_rate``,
    ``weight_decay``, ``momentum`` or ``label_smoothing``, the settings that differ between
    members), and builds each member's optimiser inside the member step from its own traced
    values (with the same state structure as ``tx``'s). Without it, every member trains with
    ``tx`` and ``label_smoothing``.

    Shapes: ``idx`` int32 ``[m, b]``, ``weight`` float32 ``[m, b]``, ``active`` bool ``[m]``,
    ``lr_scale`` float32 ``[m]`` (each member's learning-rate multiplier) or None;
    ``images``/``labels`` are the resident training set shared by all members; ``loss_sums`` is
    float32 ``[m]``, each member's weighted loss sum on its batch. ``hook``: a strategy's
    `jaxunlearn.steps.StepHook` (static), given each member's row of ``aux`` (a pytree whose
    leaves have the member axis first); ``stats``: the input normalisation
    (`jaxunlearn.steps.normalize`).
    """
    member_step = functools.partial(steps.train_step, model, tx, use_augment,
                                    label_smoothing=label_smoothing, stats=stats)

    def step(state, images, labels, idx, weight, active, lr_scale=None, aux=None, hyper=None,
             *, hook=None):
        if lr_scale is None:  # a scale of exactly 1 leaves every update's bits unchanged
            lr_scale = jnp.ones(active.shape, jnp.float32)
        if (make_tx is None) != (hyper is None):
            raise ValueError("per-member settings (hyper) go with a step made with make_tx: "
                             "pass both or neither")

        def one(s, i, w, a, r, x, h, images, labels):
            if h is None:
                return member_step(s, images, labels, i, w, a, r, hook=hook, aux=x)
            h = dict(h)  # this member's own traced settings
            smoothing = h.pop("label_smoothing", label_smoothing)
            return steps.train_step(model, make_tx(**h), use_augment, s, images, labels, i, w, a,
                                    r, label_smoothing=smoothing, hook=hook, aux=x, stats=stats)
        return over_members(layout, one, (state, idx, weight, active, lr_scale, aux, hyper),
                            images, labels)

    return step


def make_loss_grads(model: nn.Module, layout: str,
                    stats: steps.Stats = steps.CIFAR10_STATS) -> Callable:
    """Returns ``grads(state, images, labels, idx, weight) -> params-shaped [m, ...]``: each
    member's gradient of its weighted loss sum on its batch (`jaxunlearn.steps.loss_grads`)."""

    def grads(state, images, labels, idx, weight):
        return over_members(layout, lambda s, i, w, images, labels: steps.loss_grads(
            model, s, images, labels, i, w, stats), (state, idx, weight), images, labels)

    return grads


def make_eval_logits(model: nn.Module, layout: str, flip: bool = False,
                     stats: steps.Stats = steps.CIFAR10_STATS) -> Callable:
    """Returns ``logits(state, images, idx) -> [m, b, classes]``: every member on the same batch
    (with ``flip``, averaged with the mirror images: `jaxunlearn.steps.eval_logits`)."""

    def logits(state, images, idx):
        return over_members(layout, lambda s, images, idx: steps.eval_logits(
            model, s, images, idx, flip, stats), (state,), images, idx)

    return logits


def reset_optimizer(tx: optax.GradientTransformation, state: MemberState,
                    mask: jax.Array) -> MemberState:
    """A fresh optimiser state for the members in ``mask`` (bool ``[m]``); the original
    protocol restarts Adam every phase. The others come back unchanged."""
    fresh = state._replace(opt_state=jax.vmap(tx.init)(state.params))
    return select_members(mask, fresh, state)


def rebase(tx: optax.GradientTransformation, state: MemberState, base: dict,
           mask: jax.Array) -> MemberState:
    """The members in ``mask`` (bool ``[m]``) start from ``base`` (one member's ``params`` and
    ``batch_stats``, no member axis: a pretrained initialisation) with a fresh optimiser state;
    their step and key stay. The others come back unchanged."""
    m = state.step.shape[0]
    stack = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (m,) + x.shape), tree)
    params = stack(base["params"])
    based = state._replace(params=params, batch_stats=stack(base["batch_stats"]),
                           opt_state=jax.vmap(tx.init)(params))
    return select_members(mask, based, state)


def select_members(mask: jax.Array, on_true: MemberState, on_false: MemberState) -> MemberState:
    """Per-member choice between two stacked states: ``mask`` bool ``[m]``."""

    def pick(a, b):
        return jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b)

    return jax.tree.map(pick, on_true, on_false)
