"""``rewind`` (SISA's slices): an invalid member is restored to its last recorded stage (a
phase, or a slice with ``plan=shards slices=S``) whose lineage holds none of the deleted ids,
then retrained forward over the stages it lost, on its own samples minus the deleted ids, with
the batch order it had. Its parameters equal the oracle's bit for bit, at a fraction of the
cost.

State: ``snapshots``, every member's state and lineage at each stage boundary ("0": the
initial state). A member replayed over a stage replaces its rows of that stage's snapshot, so
no snapshot keeps a deleted id."""

from __future__ import annotations

import flax.serialization
import jax
import numpy as np

from jaxunlearn.strategies.base import Context, Outcome, Strategy, replay


class Rewind(Strategy):
    name = "rewind"
    order = 1

    def init(self, ctx: Context) -> dict:
        return {"snapshots": self._record({}, ctx, 0, np.ones(ctx.group.members, bool))}

    def after_stage(self, state, ctx, stage, members):
        return {"snapshots": self._record(state["snapshots"], ctx, stage.t, members)}

    def unlearn(self, state, ctx, phase, ids, invalid):
        group, snapshots = ctx.group, dict(state["snapshots"])
        points = np.full(group.members, -1, np.int64)
        for i in np.flatnonzero(invalid):  # the last stage whose lineage holds none of ids
            points[i] = max(int(t) for t, snap in snapshots.items()
                            if not snap["seen"][i, ids].any())
        self._restore(ctx, snapshots, points)

        def record(stage, active):
            snapshots.update(self._record(snapshots, ctx, stage.t, active))

        cost = replay(ctx, invalid, points, ctx.stages.last(group.source, phase), "rewind", record)
        rewound = {int(i): int(points[i]) for i in np.flatnonzero(invalid)}
        return {"snapshots": snapshots}, Outcome(
            cost, np.ones(group.members, bool), bool(invalid.any()), int(invalid.sum()),
            {"rewound_to": rewound})

    def lineage_paths(self, state):
        return {f"rewind snapshot of stage {t}": ("snapshots", t, "seen")
                for t in sorted(state["snapshots"], key=int)}

    @staticmethod
    def _keeps_optimizer(ctx: Context) -> bool:
        # A snapshot needs the optimiser state only when a replay can start mid-phase or keeps
        # it across phases; otherwise the replay resets it first (a third of Adam's memory).
        return not (ctx.cfg.reset_optimizer_each_phase
                    and ctx.stages.slices(ctx.group.source) == 1)

    def _record(self, snapshots: dict, ctx: Context, t: int, members: np.ndarray) -> dict:
        """``snapshots`` with ``members``' current state and lineage as their state at stage
        ``t``."""
        state = flax.serialization.to_state_dict(ctx.group.host_state())
        if not self._keeps_optimizer(ctx):
            state.pop("opt_state")
        snap = {"state": state, "seen": ctx.group.lineage.seen.copy()}
        old = snapshots.get(str(t))
        if old is not None and not members.all():
            def pick(new, kept):
                return np.where(members.reshape((-1,) + (1,) * (kept.ndim - 1)), new, kept)

            snap = jax.tree.map(pick, snap, old)
        return {**snapshots, str(t): snap}

    def _restore(self, ctx: Context, snapshots: dict, points: np.ndarray) -> None:
        """Restores each member with a point (>= 0) to its snapshot at that stage."""
        group = ctx.group
        current = flax.serialization.to_state_dict(group.host_state())
        for t in np.unique(points[points >= 0]):
            mask = points == t
            snap = snapshots[str(int(t))]
            # Without a saved optimiser state, keep the current one: the replay resets it.
            state = {"opt_state": current["opt_state"], **snap["state"]}
            group.set_members(mask, group.state_from_dict(state))
            group.lineage.seen[mask] = snap["seen"][mask]
