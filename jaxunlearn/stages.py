"""Stages: what each model group trains on, drawn under its sampling plan and recorded.

A group trains in *stages*: one per phase, or ``slices`` per phase for the ``shards`` plan
(each slice a point `rewind` can return to). Stage ``t`` (1-based, ``t = (phase - 1) * slices +
slice``) records every member's sample as drawn; a replay trains on it minus the ids deleted
since. Each group draws from its own random stream, so changing one part of a run never shifts
the samples another part draws.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jaxunlearn import plans
from jaxunlearn.config import Config

# A group's track of stages and batch orders: the ensemble's (also replayed by its oracle) or
# the baseline's. The index enters every batch-order seed.
TRACKS = {"ensemble": 0, "baseline": 1}


class Stage(NamedTuple):
    """One training stage of a group."""

    track: str  # whose stages: "ensemble" or "baseline"
    t: int  # the stage's index, 1-based
    phase: int
    slice: int  # 1..slices
    slices: int  # slices per phase of this track
    samples: list  # each member's ids as drawn (ragged)
    pool: np.ndarray | None  # what a bootstrap/subset member drew from (None: deterministic)


class _Plan(NamedTuple):
    plan: str
    fraction: float
    members: int
    slices: int


class Stages:
    """The recorded stages of every group, and the draws of new ones."""

    def __init__(self, cfg: Config, chunks: list[np.ndarray]):
        self.chunks = chunks
        self.plans = {"ensemble": _Plan(cfg.plan, cfg.fraction, cfg.members + cfg.shadow_members,
                                        cfg.slices if cfg.plan == "shards" else 1),
                      "baseline": _Plan(cfg.baseline_plan, cfg.baseline_fraction, 1, 1)}
        self.rngs = {track: plans.stream(cfg.seed, track) for track in TRACKS}
        self.shards = (plans.make_shards(plans.stream(cfg.seed, "shards"), chunks, cfg.members,
                                         cfg.slices) if cfg.plan == "shards" else None)
        self.recorded: dict[str, dict[int, Stage]] = {track: {} for track in TRACKS}
        # Wall seconds of each stage's training of the whole group, as first run (compilation
        # left out): what retraining it from scratch takes.
        self.seconds: dict[str, dict[int, float]] = {track: {} for track in TRACKS}

    def slices(self, track: str) -> int:
        return self.plans[track].slices

    def last(self, track: str, phase: int) -> int:
        """The index of the last stage of ``phase``."""
        return phase * self.slices(track)

    def get(self, track: str, t: int) -> Stage:
        return self.recorded[track][t]

    def draw(self, track: str, phase: int, slice_: int, deleted: np.ndarray) -> Stage:
        """Draws and records the samples of stage (``phase``, ``slice_``) under the track's
        plan, never drawing a ``deleted`` id."""
        stage = self._draw(track, phase, slice_, deleted, self.rngs[track])
        self.recorded[track][stage.t] = stage
        return stage

    def redraw(self, track: str, phase: int, deleted: np.ndarray,
               rng: np.random.Generator) -> Stage:
        """A new draw of the last stage of ``phase`` from ``rng`` (shards: the members' own
        shards again), not recorded: what `replace` retrains a fresh member on after the last
        phase."""
        stage = self._draw(track, phase, self.slices(track), deleted, rng)
        return stage._replace(pool=None)

    def _draw(self, track, phase, slice_, deleted, rng) -> Stage:
        p = self.plans[track]
        make = lambda samples, pool=None: Stage(track, (phase - 1) * p.slices + slice_, phase,
                                                slice_, p.slices, list(samples), pool)
        if p.plan == "shards":
            return make(plans.shard_samples(self.shards, phase, slice_, deleted))
        if p.plan == "full":
            return make([plans.working_set(self.chunks, phase, deleted)] * p.members)
        return make(plans.draw_samples(rng, p.plan, p.fraction, p.members, self.chunks, phase,
                                       deleted), plans.pool(p.plan, self.chunks, phase, deleted))

    def retrain_cost(self, track: str, upto: int, deleted: np.ndarray, epochs: int) -> dict:
        """What retraining every member of ``track`` from scratch on stages ``1..upto`` minus
        the ``deleted`` ids costs (computed, not run)."""
        examples = sum(len(s) for t in range(1, upto + 1)
                       for s in plans.without(self.get(track, t).samples, deleted))
        return {"member_epochs": self.plans[track].members * upto * epochs,
                "member_examples": examples * epochs}

    def retrain_seconds(self, track: str, upto: int) -> float:
        """Seconds the run's own training of stages ``1..upto`` of ``track`` took: what the
        oracle retraining everything from scratch would take (measured, not modelled)."""
        return float(sum(self.seconds[track].get(t, 0.0) for t in range(1, upto + 1)))

    def expected_invalidated(self, track: str, ids: np.ndarray, born: np.ndarray,
                             upto: int) -> float:
        """The expected number of members whose lineage holds any of ``ids``, from the plan:
        each member's probability of drawing none of them in the stages since its birth."""
        plan, expected = self.plans[track].plan, 0.0
        for i in range(len(born)):
            avoid = 1.0
            for t in range(1, upto + 1):
                stage = self.get(track, t)
                if stage.phase > born[i]:
                    avoid *= plans.avoid_probability(plan, stage.pool, stage.samples[i], ids)
            expected += 1.0 - avoid
        return expected

    # ---- durable state -------------------------------------------------------------------

    def state_dict(self) -> dict:
        recorded = {track: {str(t): {"phase": s.phase, "slice": s.slice,
                                     "samples": pack_ragged(s.samples),
                                     **({"pool": s.pool} if s.pool is not None else {})}
                            for t, s in by_t.items()}
                    for track, by_t in self.recorded.items()}
        return {"recorded": recorded,
                "rngs": {track: rng.bit_generator.state for track, rng in self.rngs.items()},
                "seconds": {track: {str(t): s for t, s in by_t.items()}
                            for track, by_t in self.seconds.items()}}

    def load_state_dict(self, state: dict) -> None:
        for track, by_t in state["recorded"].items():
            self.recorded[track] = {
                int(t): Stage(track, int(t), s["phase"], s["slice"], self.slices(track),
                              unpack_ragged(s["samples"]),
                              np.asarray(s["pool"]) if "pool" in s else None)
                for t, s in by_t.items()}
        for track, rng in self.rngs.items():
            rng.bit_generator.state = state["rngs"][track]
        self.seconds = {track: {int(t): s for t, s in state["seconds"][track].items()}
                        for track in TRACKS}


def pack_ragged(arrays: list[np.ndarray]) -> dict:
    """A list of 1-D int arrays as ``{"ids": flat, "offsets": [len + 1]}``."""
    lengths = [len(a) for a in arrays]
    flat = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
    return {"ids": np.asarray(flat, np.int64),
            "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)}


def unpack_ragged(packed: dict) -> list[np.ndarray]:
    ids, offsets = np.asarray(packed["ids"]), np.asarray(packed["offsets"])
    return [ids[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
