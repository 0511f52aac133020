"""``rewind`` (SISA's slices): an invalid member is restored to its last recorded stage (a
phase, or a slice with ``plan=shards slices=S``) whose lineage holds none of the deleted ids,
then retrained forward over the stages it lost, on its own samples minus the deleted ids, with
the batch order it had: what retraining it from scratch would give, at a fraction of the cost.

State: for each stage ``t`` (``"0"``: the initial state) every member's lineage then and where
its state then is kept, ``SNAPSHOT#mI``: member I's row of a snapshot (`jaxunlearn.snapshots`;
the initial state needs none: it is drawn again from the group's key). The members that
finish a stage together are written as one snapshot (one write per stage, not per member: a
write has a fixed cost that dominates for small models). A member replayed over a stage gets a
new snapshot of it, so no snapshot the state names holds a deleted id; an old one is deleted
once no kept checkpoint names any of its rows.
"""

from __future__ import annotations

import flax.serialization
import jax
import numpy as np

from jaxunlearn.snapshots import SnapshotError
from jaxunlearn.strategies.base import Context, Outcome, Strategy, replay


class Rewind(Strategy):
    name = "rewind"
    order = 1

    def init(self, ctx: Context) -> dict:
        m = ctx.group.members
        return {"stages": {"0": {"seen": np.zeros_like(ctx.group.lineage.seen),
                                 "files": [""] * m}}, "written": 0}

    def after_stage(self, state, ctx, stage, members):
        return self._record(state, ctx, stage.t, members)

    def unlearn(self, state, ctx, phase, ids, invalid):
        group = ctx.group
        points = np.full(group.members, -1, np.int64)
        for i in np.flatnonzero(invalid):  # the last stage whose lineage holds none of ids
            points[i] = max(int(t) for t, snap in state["stages"].items()
                            if not snap["seen"][i, ids].any())
        points = self._restore(state, ctx, points)
        kept = [state]

        def record(stage, active):
            kept[0] = self._record(kept[0], ctx, stage.t, active)

        cost = replay(ctx, invalid, points, ctx.stages.last(group.track, phase), "rewind", record)
        rewound = {int(i): int(points[i]) for i in np.flatnonzero(invalid)}
        return kept[0], Outcome(cost, np.ones(group.members, bool), bool(invalid.any()),
                                int(invalid.sum()), {"rewound_to": rewound})

    def lineage_paths(self, state):
        return {f"rewind snapshot of stage {t}": ("stages", t, "seen")
                for t in sorted(state["stages"], key=int)}

    def snapshot_names(self, state) -> set[str]:
        return {f.split("#")[0] for snap in state["stages"].values() for f in snap["files"] if f}

    @staticmethod
    def _keeps_optimizer(ctx: Context) -> bool:
        # A snapshot needs the optimiser state only when a replay can start mid-phase or keeps
        # it across phases; otherwise the replay resets it first (a third of Adam's memory).
        return not (ctx.cfg.reset_optimizer_each_phase
                    and ctx.stages.slices(ctx.group.track) == 1)

    def _record(self, state: dict, ctx: Context, t: int, members: np.ndarray) -> dict:
        """``state`` with ``members``' current states written as their snapshots of stage
        ``t``, and their lineages noted."""
        group, written = ctx.group, state["written"]
        host = flax.serialization.to_state_dict(group.host_state())
        if not self._keeps_optimizer(ctx):
            host.pop("opt_state")
        old = state["stages"].get(str(t))
        seen = group.lineage.seen.copy() if old is None else old["seen"].copy()
        files = [""] * group.members if old is None else list(old["files"])
        rows = np.flatnonzero(members)
        if rows.size:
            name = f"{group.name}-t{t}-{written}"
            written += 1
            ctx.snapshots.write(name, {f"m{i}": {"state": jax.tree.map(lambda x: x[i], host)}
                                       for i in rows})
            for i in rows:
                files[i] = f"{name}#m{i}"
                seen[i] = group.lineage.seen[i]
        return {"stages": {**state["stages"], str(t): {"seen": seen, "files": files}},
                "written": written}

    def _restore(self, state: dict, ctx: Context, points: np.ndarray) -> np.ndarray:
        """Restores each member with a point (>= 0) to its snapshot at that stage; a member
        whose snapshot cannot be read goes back to the previous clean one (the initial state
        at the latest). Returns the points used."""
        group = ctx.group
        host = flax.serialization.to_state_dict(group.host_state())
        initial, read = None, {}

        def row_of(entry: str):  # "SNAPSHOT#mI": member I's row, each snapshot read once
            name, _, key = entry.partition("#")
            if name not in read:
                read[name] = ctx.snapshots.read(name)
            if key and key not in read[name]:
                raise SnapshotError(f"snapshot {name} holds no row {key}")
            return read[name][key]["state"] if key else read[name]["state"]

        for i in np.flatnonzero(points >= 0):
            while True:
                name = state["stages"][str(points[i])]["files"][i]
                try:
                    row = row_of(name) if name else None
                    break
                except SnapshotError:  # an earlier stage's state is clean too, if older
                    points[i] = max(int(t) for t in state["stages"] if int(t) < points[i])
            if row is None:  # the initial state, drawn again from the key
                if initial is None:
                    initial = flax.serialization.to_state_dict(
                        jax.tree.map(np.asarray, group.initial_state()))
                row = jax.tree.map(lambda x: x[i], initial)
            for key, value in row.items():  # without an optimiser state: the replay resets it
                host[key] = jax.tree.map(lambda h, r: _set_row(h, i, r), host[key], value)
            group.lineage.seen[i] = state["stages"][str(points[i])]["seen"][i]
        group.set_members(points >= 0, group.state_from_dict(host))
        return points


def _set_row(stacked: np.ndarray, i: int, row) -> np.ndarray:
    stacked = np.array(stacked)
    stacked[i] = row
    return stacked
