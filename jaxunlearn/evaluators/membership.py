"""``mia``: a loss-based membership-inference attack (`jaxunlearn.mia`) that tries to tell the
forget set from as many test examples, cross-validated over ``mia_folds`` folds. 0.5 means the
deleted examples look like unseen ones; well above it, the model still remembers them."""

from __future__ import annotations

from jaxunlearn import mia
from jaxunlearn.evaluators.base import FOLDS, Evaluation, Evaluator


class Membership(Evaluator):
    name = "mia"
    carry_before = True
    settings = FOLDS

    def run(self, evaluation: Evaluation) -> dict[str, dict]:
        out = {}
        for model in evaluation.models:
            forget = evaluation.scores(model, "forget")[1]
            if forget is None:
                out[model.name] = {"n": 0, "skipped": "no deleted example or no live member"}
            else:
                out[model.name] = mia.loss_attack(forget, evaluation.scores(model, "test")[1],
                                                  folds=self.cfg.mia_folds, seed=self.cfg.seed)
        return {"mia": out}
