"""``replace`` (the original study): an invalid member is reinitialised and joins the next
phase like the others; after the last phase it retrains at once on a new draw of the last
stage's plan, without the deleted ids. Cheapest; the fresh member has lost all it learned."""

from __future__ import annotations

import jax
import numpy as np

from jaxunlearn import plans
from jaxunlearn.strategies.base import Context, Outcome, Strategy
from jaxunlearn.trainer import Cost


class Replace(Strategy):
    name = "replace"
    order = 0

    def init(self, ctx: Context) -> dict:
        # Retraining rounds so far (each seeds its batch order) and the stream of new draws.
        return {"rounds": 0, "rng": plans.stream(ctx.cfg.seed, "retrain").bit_generator.state}

    def unlearn(self, state, ctx, phase, ids, invalid):
        group, everyone = ctx.group, np.ones(ctx.group.members, bool)
        group.unlearn(jax.random.fold_in(ctx.key, phase), invalid)
        group.lineage.reset(invalid, phase)
        replaced = int(invalid.sum())
        if phase < ctx.cfg.phases:  # the fresh members join the next phase
            return state, Outcome(Cost(), ~invalid, False, replaced)
        if not invalid.any():
            return state, Outcome(Cost(), everyone, False, 0)
        rng = np.random.default_rng()
        rng.bit_generator.state = state["rng"]
        rounds = state["rounds"] + 1
        stage = ctx.stages.redraw(group.track, phase, ctx.deleted, rng)
        cost = ctx.trainer.train(group, stage, invalid, kind="retrain", round_=rounds)
        return ({"rounds": rounds, "rng": rng.bit_generator.state},
                Outcome(cost, everyone, True, replaced))
