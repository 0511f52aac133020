"""Unlearning: reinitialise the members whose lineage holds a deleted example.

`unlearn(key, state, invalid)` is pure: it draws a fresh initialisation for every member from
``key`` and keeps it only where ``invalid`` is true (`jnp.where` over the member axis). The mask
is a traced array, so a new deletion request never recompiles, and members outside the mask come
back bit-identical. Applying it twice with the same key equals applying it once.

Retraining strategies decide what an invalidated member trains on afterwards:

* ``replace`` (the original study): the fresh member joins the next phase and trains on that
  phase's sample like the others; after the last phase it trains at once on a new draw of the
  last phase's plan (without the deleted examples).
* ``rewind`` (SISA's slices): the member is restored to its last recorded state (a phase or
  slice boundary) whose lineage holds none of the deleted ids, then retrained forward over the
  stages it lost, on its own samples minus the deleted ids, with the batch order it had.
* ``oracle``: every member is retrained from its initial state on every stage's samples minus
  the deleted ids: the exact reference, at the full cost of training.

The driver (`jaxunlearn.experiment`) carries out ``rewind`` and ``oracle``; this function is
the reinitialisation that ``replace`` uses.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import optax

from jaxunlearn import sharding, train
from jaxunlearn.ensemble import select_members
from jaxunlearn.train import MemberState, PRNGKey

RETRAIN_STRATEGIES = ("replace", "rewind", "oracle")


def make_unlearn(model: nn.Module, tx: optax.GradientTransformation, mesh=None) -> Callable:
    """Returns the pure ``unlearn(key, state, invalid) -> state``.

    Args (of the returned function):
      key: PRNG key for the fresh members (member ``i`` uses ``split(key, m)[i]``).
      state: stacked `MemberState`, member axis first.
      invalid: bool ``[m]``; true members get fresh params, batch statistics, optimiser state,
        step 0 and a new member key.

    With a ``mesh`` (`jaxunlearn.sharding.member_mesh`) the function is a `shard_map` over the
    member axis: each device draws the fresh members of its own slice, with the same keys as
    the unsharded function, so both give the same result.
    """
    init = functools.partial(train.init_member, model, tx)

    def fresh_select(key, state, invalid, total, start):
        m = state.step.shape[0]
        keys = jax.lax.dynamic_slice_in_dim(jax.random.split(key, total), start, m)
        return select_members(invalid, jax.vmap(init)(keys), state)

    if mesh is None:
        def unlearn(key: PRNGKey, state: MemberState, invalid: jax.Array) -> MemberState:
            return fresh_select(key, state, invalid, state.step.shape[0], 0)

        return unlearn

    def local(key, state, invalid):
        m = state.step.shape[0]
        start = jax.lax.axis_index(sharding.MEMBER_AXIS) * m
        return fresh_select(key, state, invalid, m * mesh.size, start)

    return sharding.shard(local, mesh, (sharding.REPLICATED, sharding.MEMBERS, sharding.MEMBERS),
                          sharding.MEMBERS)


def check_strategy(name: str) -> str:
    if name not in RETRAIN_STRATEGIES:
        raise ValueError(f"unknown unlearning strategy {name!r}; choose one of {RETRAIN_STRATEGIES}")
    return name

