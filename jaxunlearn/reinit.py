"""Unlearning's device primitive: reinitialise the members whose lineage holds a deleted id.

`unlearn(key, state, invalid)` is pure: it draws a fresh initialisation for every member from
``key`` and keeps it only where ``invalid`` is true (`jnp.where` over the member axis). The mask
is a traced array, so a new deletion request never recompiles, and members outside the mask come
back bit-identical. Applying it twice with the same key equals applying it once.

What an invalidated member trains on afterwards is the business of the unlearning strategies
(`jaxunlearn.strategies`).
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import optax

from jaxunlearn import sharding, steps
from jaxunlearn.ensemble import select_members
from jaxunlearn.steps import MemberState, PRNGKey

def make_reinit(model: nn.Module, tx: optax.GradientTransformation, mesh=None,
                input_shape: tuple = (32, 32, 3)) -> Callable:
    """Returns the pure ``unlearn(key, state, invalid) -> state`` (``input_shape``: one
    example's shape, for the fresh initialisation).

    Args (of the returned function):
      key: PRNG key for the fresh members (member ``i`` uses ``split(key, m)[i]``).
      state: stacked `MemberState`, member axis first.
      invalid: bool ``[m]``; true members get fresh params, batch statistics, optimiser state,
        step 0 and a new member key.

    With a ``mesh`` (`jaxunlearn.sharding.member_mesh`) the function is a `shard_map` over the
    member axis: each device draws the fresh members of its own slice, with the same keys as
    the unsharded function, so both give the same result.
    """
    init = functools.partial(steps.init_member, model, tx, input_shape=input_shape)

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
