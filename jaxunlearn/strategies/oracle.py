"""``oracle``: retrain from the initial state on every stage's samples minus the deleted ids,
the exact reference that measures the others' cost and quality; and `Reference`, the oracle
kept beside another strategy for comparison (``oracle_reference``)."""

from __future__ import annotations

import numpy as np

from jaxunlearn.group import ModelGroup
from jaxunlearn.strategies.base import Context, Outcome, Strategy, replay
from jaxunlearn.strategies.rewind import Rewind
from jaxunlearn.trainer import Cost


class Oracle(Strategy):
    name = "oracle"
    order = 2
    reference = True

    def unlearn(self, state, ctx, phase, ids, invalid):
        group = ctx.group
        everyone = np.ones(group.members, bool)
        if not invalid.any():  # no member saw an id: retraining would give the same bits
            return state, Outcome(Cost(), everyone, False, 0)
        group.reinitialise()
        cost = replay(ctx, everyone, np.zeros(group.members, np.int64),
                      ctx.stages.last(group.track, phase), "oracle")
        return state, Outcome(cost, everyone, True, group.members)


class Reference:
    """The oracle reference of a group: a copy trained from scratch on its stages minus the
    deleted ids, then kept exact by `rewind` (a reference member whose lineage holds none of
    new ids is unchanged; one that does is restored and replayed: what retraining from scratch
    would give), and extended stage by stage. Under a strategy whose result is the oracle
    itself, the group is its own reference.

    A deletion it is not asked to follow drops it if it holds one of the ids (so no kept state
    depends on them); it is then trained again only on request."""

    def __init__(self, strategy: Strategy):
        self.strategy, self.rewind = strategy, Rewind()
        self.group: ModelGroup | None = None
        self.state: dict = {}
        self.upto = 0  # the last stage it has trained
        self.trained = False  # it was trained at least once (a dropped one is not retrained)

    def get(self, ctx: Context, upto: int) -> tuple[ModelGroup, Cost | None, bool]:
        """The reference for ``ctx.group`` at stage ``upto``, brought up to date: returns it,
        what updating it cost, and whether that was a training from scratch (None cost when
        the group is its own reference)."""
        if self.strategy.reference:
            return ctx.group, None, False
        fresh = self.group is None
        if fresh:
            self.group = ctx.group.fresh("oracle")
            self.state, self.upto, self.trained = self.rewind.init(self._ctx(ctx)), 0, True
        octx = self._ctx(ctx)
        cost = Cost()
        seen = self.group.lineage.seen
        stale = seen[:, ctx.deleted].any(axis=1)
        if stale.any():
            ids = np.flatnonzero(ctx.deleted & seen[stale].any(axis=0))
            slices = ctx.stages.slices(self.group.track)
            self.state, outcome = self.rewind.unlearn(self.state, octx, self.upto // slices,
                                                      ids, stale)
            cost += outcome.cost
        everyone = np.ones(self.group.members, bool)
        for t in range(self.upto + 1, upto + 1):
            stage = ctx.stages.get(self.group.track, t)
            cost += ctx.trainer.train(self.group, stage, everyone, kind="oracle")
            self.state = self.rewind.after_stage(self.state, octx, stage, everyone)
        self.upto = max(self.upto, upto)
        return self.group, cost, fresh

    def follow(self, deleted: np.ndarray) -> None:
        """A deletion the reference does not unlearn: it is dropped if it depends on an id."""
        if self.group is not None and self.group.lineage.seen[:, deleted].any():
            self.group, self.state, self.upto = None, {}, 0

    def _ctx(self, ctx: Context) -> Context:
        return ctx._replace(group=self.group)

    def lineage_paths(self) -> dict[str, tuple]:
        if self.group is None:
            return {}
        return {"oracle reference": ("group", "lineage", "seen"),
                **{f"oracle reference {where}": ("strategy", *path)
                   for where, path in self.rewind.lineage_paths(self.state).items()}}

    def snapshot_names(self, tree: dict) -> set[str]:
        """The snapshots a reference state (`state_dict`, from a checkpoint's JSON too)
        names."""
        return self.rewind.snapshot_names(tree["strategy"]) if tree.get("strategy") else set()

    def state_dict(self) -> dict:
        return {"upto": self.upto, "trained": self.trained,
                "group": self.group.state_dict() if self.group is not None else {},
                "strategy": self.state}

    def load_state_dict(self, tree: dict, ctx: Context) -> None:
        self.upto, self.trained, self.state = tree["upto"], tree["trained"], tree["strategy"]
        self.group = None
        if tree["group"]:
            self.group = ctx.group.fresh("oracle", initialise=False)
            self.group.load_state_dict(tree["group"])
