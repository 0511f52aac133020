"""``scrub`` (SCRUB, Kurmanji et al., NeurIPS 2023: "Towards unbounded machine unlearning"):
the invalid members become students of their own state before unlearning (the teacher), pushed
away from it on the forget set and held to it on the retained sample.

Each of ``unlearn_epochs`` epochs is a min pass over the member's retained sample (cross-entropy
plus the teacher-student KL divergence: SCRUB's ``gamma`` 0.99 and ``alpha`` 0.001, temperature
4: `GAMMA`, `ALPHA`, `T`, added to the member step by `HOOK`); the first half of them (SCRUB's ``msteps``), rounded up, start
with a max pass over the forgotten ids the member held (the KL divergence ascended). One
optimiser state runs through all passes, at ``unlearn_lr`` times the learning rate. The teacher's
logits are computed once, on every training example, before the first pass (un-augmented: with
``augment=true`` the student sees crops and flips of what the teacher scored). Approximate, like
the other methods of `approximate`; one device only.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxunlearn import sharding
from jaxunlearn.config import ConfigError
from jaxunlearn.stages import Stage
from jaxunlearn.steps import StepHook, distill_kl
from jaxunlearn.strategies.approximate import Approximate
from jaxunlearn.strategies.base import Outcome
from jaxunlearn.trainer import Cost, Recipe

# SCRUB's distillation (Kurmanji et al. 2023, their code's defaults): temperature, and the weights
# of the KL divergence and of the cross-entropy on the retained examples.
T, ALPHA, GAMMA = 4.0, 0.001, 0.99


def distill(teacher, logits, labels, idx, weight, loss):
    """An example's loss under distillation from ``teacher`` (the member's teacher logits on
    the resident examples ``[n, classes]``): `GAMMA` x cross-entropy plus `ALPHA` x the
    teacher-student KL divergence at temperature `T`, or, with a negative weight, the KL
    divergence alone (ascended: the student moves away from the teacher there)."""
    kl = distill_kl(logits, teacher[idx], T)
    return jnp.where(weight < 0, kl, GAMMA * loss + ALPHA * kl)


HOOK = StepHook(loss=distill)  # the member step's loss, distilled from the member's aux


class Scrub(Approximate):
    name = "scrub"
    order = 14

    def check(self, cfg, n_train):
        if cfg.devices != 1:
            raise ConfigError(f"strategy=scrub distils on one device; set devices=1 (got "
                              f"{cfg.devices})")

    def unlearn(self, state, ctx, phase, ids, invalid):
        group, cfg, everyone = ctx.group, ctx.cfg, np.ones(ctx.group.members, bool)
        if not invalid.any():
            return state, Outcome(Cost(), everyone, False, 0)
        rounds = state["rounds"] + 1
        teacher = group.member_logits(cfg.eval_batch_size, np.arange(group.data.n_train), invalid)
        teacher = group.place(np.nan_to_num(teacher), sharding.MEMBERS)
        last, retain, held = self.samples(ctx, phase, ids, invalid)
        forget = np.unique(np.concatenate(held))
        max_epochs = -(-cfg.unlearn_epochs // 2)
        cost, first = Cost(), True
        for epoch in range(1, cfg.unlearn_epochs + 1):
            # A max pass (the forgotten ids, the KL ascended), then a min pass (retained).
            passes = ([(held, forget, -1.0)] if epoch <= max_epochs else []) + [
                (retain, np.zeros(0, np.int64), 1.0)]
            for n, (samples, fed, weight) in enumerate(passes):
                stage = Stage(group.track, last.t, phase, 1, 1, samples, None)
                recipe = Recipe(1, cfg.unlearn_lr, fed, weight, hook=HOOK, aux=teacher,
                                fresh_optimizer=first)
                # Each pass its own batch order (the round seeds it).
                cost += ctx.trainer.train(group, stage, invalid, kind=self.name,
                                          round_=rounds * 1000 + 2 * epoch + n, recipe=recipe)
                first = False
        return {"rounds": rounds}, Outcome(cost, everyone, True, 0)
