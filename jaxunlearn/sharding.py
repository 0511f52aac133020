"""The member axis sharded over devices, and over hosts, with `jax.shard_map`.

Every device holds ``members / devices`` whole members and runs the single-device member
strategy (`vmap`, `map`, `hybrid:K`) on them; the training set is replicated. Members never
communicate, so the sharded step compiles with no collectives and scales with the device count.

Several hosts: every process calls `jax.distributed.initialize` and runs the same driver with the
same seed, so each computes the same host-side arrays (samples, batch indices, masks);
`put` hands every device its own slice of them, and `to_host` gathers results
(`process_allgather`, which on CPU uses gloo collectives).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MEMBER_AXIS = "members"
MEMBERS = P(MEMBER_AXIS)
REPLICATED = P()


def member_mesh(devices: int = 0) -> Mesh:
    """A 1-D mesh named ``members`` over the first ``devices`` global devices (0: all)."""
    available = jax.devices()
    n = len(available) if devices == 0 else devices
    if not 1 <= n <= len(available):
        raise ValueError(f"devices={devices} but only {len(available)} device(s) are visible "
                         f"({available[0].platform}); use devices=0 for all of them")
    return Mesh(np.array(available[:n]), (MEMBER_AXIS,))


def check_divisible(members: int, mesh: Mesh) -> None:
    if members % mesh.size:
        raise ValueError(f"{members} members cannot be split evenly over {mesh.size} devices; "
                         f"use a member count that is a multiple of {mesh.size}, or fewer devices")


def put(tree, mesh: Mesh, spec: P):
    """Places host values (the same full value in every process) as global arrays."""
    sharding = NamedSharding(mesh, spec)

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(one, tree)


def to_host(x) -> np.ndarray:
    """A device array as numpy, gathered from every process when it spans several."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def shard(fn, mesh: Mesh, in_specs, out_specs):
    """`jax.shard_map` of a per-device function over the member mesh."""
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
