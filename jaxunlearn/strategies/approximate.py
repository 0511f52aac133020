"""Approximate unlearning (``exact = False``): the invalid members are trained further so that
they forget the deleted ids, instead of being retrained without them. Cheap, but no guarantee:
their lineage still holds the deleted ids (the audit says so, by design), and how much they
still remember is for the evaluators (membership inference, the gap to the oracle) to show.

Each trains only the invalid members (as a stack of their own; the others stay bit-identical)
for ``unlearn_epochs`` at a constant learning rate of ``unlearn_lr`` times ``learning_rate``
with a fresh optimiser state, on the member's retained sample: its sample of the last stage
minus the deleted ids. The forget set of a member is the ids of this request in its lineage.

* ``finetune`` ("FT"; e.g. Warnecke et al. 2023, SalUn's baseline): the retained sample only;
  forgetting comes from catastrophic forgetting.
* ``neggrad`` ("NegGrad+", Kurmanji et al. 2023): the retained sample and the forget set
  together, minimising ``beta * mean retain loss - (1 - beta) * mean forget loss``
  (``neggrad_beta``) as per-example weights: 1 on retained examples, ``-(1 - beta) / beta *
  n_retain / n_forget`` on forgotten ones (gradient ascent).
* ``random_labels`` ("RL", Golatkar et al. 2020; SalUn's baseline): the retained sample and the
  forget set, each forgotten example with a random wrong label.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from jaxunlearn import plans
from jaxunlearn.config import setting
from jaxunlearn.stages import Stage
from jaxunlearn.strategies.base import Context, Outcome, Strategy
from jaxunlearn.trainer import Cost, Recipe


class Approximate(Strategy):
    exact = False
    order = 10
    uses_forget: ClassVar[bool] = False  # trains on the forget set too
    settings = {
        "unlearn_epochs": setting(2, "approximate strategies: epochs on the retained sample",
                                  at_least=1, unlearning=True, compare=True),
        "unlearn_lr": setting(0.1, "approximate strategies: learning rate, a multiple of "
                                   "learning_rate", above=0, unlearning=True, compare=True)}

    def init(self, ctx: Context) -> dict:
        return {"rounds": 0}

    def unlearn(self, state, ctx, phase, ids, invalid):
        group, everyone = ctx.group, np.ones(ctx.group.members, bool)
        if not invalid.any():
            return state, Outcome(Cost(), everyone, False, 0)
        rounds = state["rounds"] + 1
        last, retain, held = self.samples(ctx, phase, ids, invalid)
        forget = np.unique(np.concatenate(held)) if self.uses_forget else np.zeros(0, np.int64)
        samples = [np.concatenate([r, f]) if self.uses_forget else r
                   for r, f in zip(retain, held)]
        stage = Stage(group.track, last.t, phase, 1, 1, samples, None)
        recipe = self.recipe(ctx, rounds, retain, held, forget)
        cost = ctx.trainer.train(group, stage, invalid, kind=self.name, round_=rounds,
                                 recipe=recipe)
        return {"rounds": rounds}, Outcome(cost, everyone, True, 0)

    @staticmethod
    def samples(ctx, phase, ids, invalid):
        """The last stage before ``phase``'s end, each member's retained sample (that stage's
        minus the deleted ids) and the ids of this request it held (empty unless invalid)."""
        group = ctx.group
        last = ctx.stages.get(group.track, ctx.stages.last(group.track, phase))
        held = [ids[group.lineage.seen[i, ids]] if invalid[i] else ids[:0]
                for i in range(group.members)]
        return last, plans.without(last.samples, ctx.deleted), held

    def recipe(self, ctx, rounds, retain, held, forget) -> Recipe:
        return Recipe(ctx.cfg.unlearn_epochs, ctx.cfg.unlearn_lr, forget)


class Finetune(Approximate):
    name = "finetune"


class NegGrad(Approximate):
    name = "neggrad"
    order = 11
    uses_forget = True
    settings = {"neggrad_beta": setting(0.999, "NegGrad+: beta x retain loss - (1 - beta) x "
                                               "forget loss", above=0, below=1,
                                        unlearning=True, compare=True)}

    def recipe(self, ctx, rounds, retain, held, forget):
        beta = ctx.cfg.neggrad_beta
        weight = np.array([-(1 - beta) / beta * len(r) / max(len(f), 1)
                           for r, f in zip(retain, held)], np.float32)
        return Recipe(ctx.cfg.unlearn_epochs, ctx.cfg.unlearn_lr, forget, weight)


class RandomLabels(Approximate):
    name = "random_labels"
    order = 12
    uses_forget = True

    def recipe(self, ctx, rounds, retain, held, forget):
        rng = plans.stream(ctx.cfg.seed, "random_labels", rounds)
        classes, true = ctx.group.classes, ctx.group.data.host_labels[forget]
        # A uniformly drawn wrong label: the true one plus 1..classes-1, modulo classes.
        labels = (true + rng.integers(1, classes, forget.size)) % classes
        return Recipe(ctx.cfg.unlearn_epochs, ctx.cfg.unlearn_lr, forget, 1.0, labels)
