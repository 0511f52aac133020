"""``oracle``: retrain from the initial state on every stage's samples minus the deleted ids,
the exact reference that measures the others' cost and quality; and `Reference`, the oracle
trained beside another strategy for comparison (`oracle_reference`)."""

from __future__ import annotations

import numpy as np

from jaxunlearn.group import ModelGroup
from jaxunlearn.strategies.base import Context, Outcome, Strategy, replay
from jaxunlearn.trainer import Cost


class Oracle(Strategy):
    name = "oracle"
    order = 2
    reference = True

    def __init__(self, always: bool = True):
        """``always``: retrain at every deletion, even one no member saw (else only then)."""
        self.always = always

    def unlearn(self, state, ctx, phase, ids, invalid):
        group = ctx.group
        everyone = np.ones(group.members, bool)
        if not (self.always or invalid.any()):
            return state, Outcome(Cost(), everyone, False, 0)
        group.reinitialise()
        cost = replay(ctx, everyone, np.zeros(group.members, np.int64),
                      ctx.stages.last(group.source, phase), "oracle")
        return state, Outcome(cost, everyone, True, group.members)


class Reference:
    """The oracle reference of a group: a fresh copy retrained from scratch on stages
    ``1..upto`` minus the deleted ids, kept until the stage or the deletions change. Under a
    strategy whose result is the oracle itself, the group is its own reference."""

    def __init__(self, strategy: Strategy):
        self.strategy = strategy
        self.group: ModelGroup | None = None
        self.trained_for: tuple | None = None
        self.cost: Cost | None = None

    def get(self, ctx: Context, upto: int) -> tuple[ModelGroup, Cost | None]:
        """The reference for ``ctx.group`` at stage ``upto`` and what training it cost (None
        when the group is its own reference)."""
        if self.strategy.reference:
            return ctx.group, None
        key = (upto, int(ctx.deleted.sum()))
        if self.group is None or self.trained_for != key:
            oracle = ctx.group.fresh("oracle")
            everyone = np.ones(oracle.members, bool)
            self.cost = replay(ctx._replace(group=oracle), everyone,
                               np.zeros(oracle.members, np.int64), upto, "oracle")
            self.group, self.trained_for = oracle, key
        return self.group, self.cost
