"""The strategy protocol: what happens to the members whose lineage holds a deleted id.

A strategy is a small object whose state is kept apart from it, in the spirit of optax's
``init``/``update`` pairs: `Strategy.init` builds the state, `Strategy.after_stage` updates it
after each training stage, `Strategy.unlearn` unlearns a deletion and returns the new state
with an `Outcome` (what it cost, which members count afterwards). The state is a plain dict of
numpy arrays and JSON values, so it goes into a checkpoint as it is. The driver never asks which
strategy it holds; it reads the class attributes:

* ``exact``: afterwards no live parameter depends on a deleted id (the audit holds it to that);
* ``unlearns``: the strategy removes deleted ids at all (a reference model that keeps them,
  like the original study's baseline, does not; the purge and audit skip its lineage);
* ``reference``: the strategy's result is the oracle itself, so no separate oracle is trained.

Subclasses with a ``name`` register themselves (unless not ``selectable``); `jaxunlearn.strategies` imports every module
of this package, so a new strategy is one new file. A strategy owns its settings and checks:
``settings`` declares them (``{name: config.setting(default, help, **rule)}``, read as
``ctx.cfg.NAME``; a subclass has its bases' too) and `Strategy.check` refuses a configuration
it cannot work with. A strategy defined in another module is a plug-in: a run using it records
its module and every command that reopens the run imports it again (`jaxunlearn.plugins`).
"""

from __future__ import annotations

from typing import Callable, ClassVar, Mapping, NamedTuple

import jax
import numpy as np

from jaxunlearn import config as config_lib
from jaxunlearn.config import Config
from jaxunlearn.group import ModelGroup
from jaxunlearn.stages import Stage, Stages
from jaxunlearn.trainer import Cost, Trainer

REGISTRY: dict[str, type["Strategy"]] = {}


class Context(NamedTuple):
    """What a strategy works with: the run's config, the group it unlearns, the trainer, the
    recorded stages, the deletion mask (the ids being unlearned included), a key for fresh
    members, and the run's snapshot store (`jaxunlearn.snapshots`)."""

    cfg: Config
    group: ModelGroup
    trainer: Trainer
    stages: Stages
    deleted: np.ndarray  # bool [n_train]
    key: jax.Array
    snapshots: object


class Outcome(NamedTuple):
    """What one unlearning did."""

    cost: Cost
    live: np.ndarray  # bool [m]: members that count in the ensemble right after
    retrained: bool  # members were retrained now, so their own scores are reported
    replaced: int  # members reinitialised or rewound
    details: dict = {}  # strategy-specific cost fields (rewind: "rewound_to")


class Strategy:
    name: ClassVar[str]
    exact: ClassVar[bool] = True
    unlearns: ClassVar[bool] = True
    reference: ClassVar[bool] = False
    selectable: ClassVar[bool] = True  # a `strategy=` setting may name it
    order: ClassVar[int] = 100  # where tables and sweeps list it
    # The strategy's own settings: {name: config.setting(default, help, **rule)} (`declare`).
    settings: ClassVar[Mapping] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        named = "name" in cls.__dict__ and cls.__dict__.get("selectable", True)
        if named:
            _check_free(REGISTRY, cls, "strategy")
            REGISTRY[cls.name] = cls
        config_lib.declare_class(cls, "strategies", cls.__dict__["name"] if named else "")

    def check(self, cfg: Config, n_train: int) -> None:
        """Raises ConfigError (saying what to change) when this strategy cannot work with
        ``cfg`` and ``n_train`` training examples; its settings' own rules are checked
        already (`jaxunlearn.validation.check` calls this before anything is trained)."""

    def init(self, ctx: Context) -> dict:
        """The strategy's state at the start of a run."""
        return {}

    def after_stage(self, state: dict, ctx: Context, stage: Stage,
                    members: np.ndarray) -> dict:
        """The state once ``members`` (bool ``[m]``) finished training on ``stage``."""
        return state

    def unlearn(self, state: dict, ctx: Context, phase: int, ids: np.ndarray,
                invalid: np.ndarray) -> tuple[dict, Outcome]:
        """Unlearns ``ids`` (already in ``ctx.deleted``) after ``phase``; ``invalid`` (bool
        ``[m]``) marks the members whose lineage holds one of them."""
        raise NotImplementedError

    def lineage_paths(self, state: dict) -> dict[str, tuple]:
        """Where ``state`` holds lineage matrices (bool ``[m, n_train]``) of the member states
        the strategy keeps, which must hold no deleted id either: a description of each
        ("rewind snapshot of stage 3") -> its path of keys in ``state``. Empty when it keeps
        none."""
        return {}

    def snapshot_names(self, state: dict) -> set[str]:
        """The snapshots (`jaxunlearn.snapshots`) that ``state`` names; read from a
        checkpoint's JSON part too, so it must not need the state's arrays."""
        return set()


def at_path(tree: dict, path) -> object:
    for key in path:
        tree = tree[key]
    return tree


def replay(ctx: Context, members: np.ndarray, points: np.ndarray, upto: int, kind: str,
           on_stage: Callable[[Stage, np.ndarray], None] | None = None) -> Cost:
    """Retrains ``members`` (bool ``[m]``) of ``ctx.group`` forward from their stage ``points``
    (int ``[m]``: the stage whose end state they hold now; 0 is the initial state) to stage
    ``upto``, each stage on its samples minus the deleted ids, with the run's batch order.
    ``on_stage(stage, active)`` follows each stage. Returns the cost."""
    cost = Cost()
    if not members.any():
        return cost
    for t in range(int(points[members].min()) + 1, upto + 1):
        active = members & (points < t)
        stage = ctx.stages.get(ctx.group.track, t)
        cost += ctx.trainer.train(ctx.group, stage, active, kind=kind)
        if on_stage is not None:
            on_stage(stage, active)
    return cost


def _check_free(registry: dict, cls: type, kind: str) -> None:
    """A name is one plug-in's: another module's class may not take it (a run would record
    the wrong module, and every built-in's user would get it). The same module may define it
    again (a reloaded module, a notebook cell run twice)."""
    old = registry.get(cls.name)
    if old is not None and old.__module__ != cls.__module__:
        raise TypeError(f"the {kind} name {cls.name!r} is taken by "
                        f"{old.__module__}.{old.__qualname__}; give {cls.__qualname__} another "
                        f"name")
