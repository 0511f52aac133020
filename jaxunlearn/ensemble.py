"""The stacked ensemble: one `MemberState` pytree with the member axis first on every leaf.

Member-parallel execution is a strategy, not a hard-coded `vmap`:

* ``vmap``: `jax.vmap` over members. Every convolution becomes one grouped convolution.
* ``map``: `jax.lax.map` (a scan) over members inside the same jit: M dense convolutions one
  after another. Measured ~2x faster than ``vmap`` on an H100 for ResNets, because XLA's
  grouped convolutions are slow there; on CPU it is the other way round (``benchmarks/``).

* ``hybrid:K``: vmap over groups of K members, map over the groups.

All run the same pure single-member step on the same stacked state, so they are
interchangeable and give the same result up to floating-point reassociation.
The functions returned here are not jitted: the driver jits them (with donated state).
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxunlearn import train
from jaxunlearn.train import MemberState, PRNGKey

STRATEGIES = ("vmap", "map")
# `auto`, from measurements (benchmarks/README.md): (backend, architecture) -> strategy.
# Measured: ResNet-18 (both stems) on a 2-core CPU, where the scan over members is 6-9x slower
# than vmap (XLA:CPU loses its fast convolution path inside the loop body), and on an H100,
# where map is ~2x faster than vmap (XLA's grouped convolutions are slow there). Other
# architectures take their backend's ResNet-18 entry until measured.
MEASURED_STRATEGY = {("cpu", "resnet18"): "vmap", ("gpu", "resnet18"): "map"}
_MEASURED_REFERENCE = "resnet18"


def resolve_strategy(name: str, backend: str | None = None, arch: str = "resnet18") -> str:
    """``auto`` -> the measured strategy for ``backend`` (default: JAX's) and ``arch``.

    Names: ``vmap``, ``map``, or ``hybrid:K`` (vmap over groups of K members, map over the
    groups; the member count must be a multiple of K).
    """
    if name == "auto":
        backend = backend or jax.default_backend()
        return MEASURED_STRATEGY.get((backend, arch),
                                     MEASURED_STRATEGY.get((backend, _MEASURED_REFERENCE), "vmap"))
    if name in STRATEGIES or hybrid_group_size(name):
        return name
    raise ValueError(f"unknown member-parallel strategy {name!r}; choose auto, vmap, map or "
                     "hybrid:K (K members per vmapped group)")


def hybrid_group_size(strategy: str) -> int | None:
    """K for a well-formed ``hybrid:K`` (K >= 1), else None."""
    kind, _, k = strategy.partition(":")
    return int(k) if kind == "hybrid" and k.isdigit() and int(k) >= 1 else None


def over_members(strategy: str, fn: Callable, per_member, *shared):
    """Applies ``fn(member_args..., *shared)`` to every member.

    ``per_member`` is a tuple of pytrees whose leaves have the member axis first; ``shared``
    arguments are the same for every member (for example the resident dataset).
    """
    def vmapped(args):
        return jax.vmap(lambda *a: fn(*a, *shared))(*args)

    if strategy == "vmap":
        return vmapped(per_member)
    if strategy == "map":
        return jax.lax.map(lambda a: fn(*a, *shared), per_member)
    k = hybrid_group_size(strategy)
    if k:
        m = jax.tree.leaves(per_member)[0].shape[0]
        if m % k:
            raise ValueError(f"member_parallel={strategy} needs a member count divisible by {k}, "
                             f"got {m}; choose K dividing {m}")
        grouped = jax.tree.map(lambda x: x.reshape((m // k, k) + x.shape[1:]), per_member)
        out = jax.lax.map(vmapped, grouped)
        return jax.tree.map(lambda x: x.reshape((m,) + x.shape[2:]), out)
    raise ValueError(f"unknown member-parallel strategy {strategy!r}")


def init_ensemble(model: nn.Module, tx: optax.GradientTransformation, key: PRNGKey,
                  members: int) -> MemberState:
    """Initialises ``members`` members by vmapping the single-member init over split keys."""
    if members < 1:
        raise ValueError(f"an ensemble needs at least one member, got {members}")
    keys = jax.random.split(key, members)
    return jax.vmap(functools.partial(train.init_member, model, tx))(keys)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, strategy: str,
                    use_augment: bool = False) -> Callable:
    """Returns ``step(state, images, labels, idx, weight, active) -> (state, loss_sums)``.

    Shapes: ``idx`` int32 ``[m, b]``, ``weight`` float32 ``[m, b]``, ``active`` bool ``[m]``;
    ``images``/``labels`` are the resident training set shared by all members; ``loss_sums`` is
    float32 ``[m]``, each member's weighted loss sum on its batch.
    """
    member_step = functools.partial(train.train_step, model, tx, use_augment)

    def step(state, images, labels, idx, weight, active):
        def one(s, i, w, a, images, labels):
            return member_step(s, images, labels, i, w, a)
        return over_members(strategy, one, (state, idx, weight, active), images, labels)

    return step


def make_eval_logits(model: nn.Module, strategy: str) -> Callable:
    """Returns ``logits(state, images, idx) -> [m, b, classes]``: every member on the same batch."""

    def logits(state, images, idx):
        return over_members(strategy, lambda s, images, idx: train.eval_logits(model, s, images, idx),
                            (state,), images, idx)

    return logits


def reset_optimizer(tx: optax.GradientTransformation, state: MemberState,
                    mask: jax.Array) -> MemberState:
    """A fresh optimiser state for the members in ``mask`` (bool ``[m]``); the original
    protocol restarts Adam every phase. The others come back unchanged."""
    fresh = state._replace(opt_state=jax.vmap(tx.init)(state.params))
    return select_members(mask, fresh, state)


def select_members(mask: jax.Array, on_true: MemberState, on_false: MemberState) -> MemberState:
    """Per-member choice between two stacked states: ``mask`` bool ``[m]``."""

    def pick(a, b):
        return jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b)

    return jax.tree.map(pick, on_true, on_false)
