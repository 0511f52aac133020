"""``lira``: per-example membership inference (offline LiRA, `jaxunlearn.mia.lira_scores`),
forget set vs the test set, from the ensemble's own members: for each live member and example,
the other live members whose lineage does not hold the example are its reference ("out")
models. A model's score on an example is its members' largest. Reports AUC (with the spread
over ``mia_folds`` parts) and the true-positive rate at 1% and 0.1% false positives.

Before unlearning, a forgotten example is in some member's lineage and that member is scored
against the others that never saw it; after exact unlearning no member holds it, and the AUC
falls to about 0.5, as for the oracle. With few members the per-example fits lean on a pooled
variance (`jaxunlearn.mia.MIN_POOL`)."""

from __future__ import annotations

import numpy as np

from jaxunlearn import mia
from jaxunlearn.evaluators.base import FOLDS, Evaluation, Evaluator, Model


def confidences(evaluation: Evaluation, model: Model, which: str) -> np.ndarray:
    """Each member's logit-scaled confidence ``[m, n]`` on set ``which`` (NaN: not live)."""
    logits = evaluation.logits(model, which)
    return mia.logit_confidence(logits, evaluation.labels(which))


def scores(evaluation: Evaluation, model: Model, which: str) -> np.ndarray:
    """``model``'s LiRA score per example of set ``which`` (``forget`` or ``test``)."""
    group = model.group
    live = np.ones(group.members, bool) if model.live is None else np.asarray(model.live, bool)
    conf = confidences(evaluation, model, which)
    n = conf.shape[1]
    if which == "test":
        seen = np.zeros((group.members, n), bool)
    else:
        seen = group.lineage.seen[:, evaluation.sets[which][0]]
    targets = np.flatnonzero(group.voters(live))  # shadow members only serve as references
    others = live[None, :] & (np.arange(group.members)[None, :] != targets[:, None])  # [t, m]
    out = others[:, :, None] & ~seen[None, :, :]
    pool = np.where(np.isfinite(conf), conf, 0.0)
    return mia.lira_scores(pool[targets], np.broadcast_to(pool, (len(targets),) + pool.shape),
                           out)


class LiRA(Evaluator):
    name = "lira"
    carry_before = True
    settings = FOLDS

    def run(self, evaluation: Evaluation) -> dict[str, dict]:
        out = {}
        for model in evaluation.models:
            live = (model.group.members if model.live is None else int(np.sum(model.live)))
            voters = model.group.voters(model.live)
            if not len(evaluation.sets["forget"][0]) or live < 2 or not voters.any():
                out[model.name] = {"n": 0, "skipped": "no deleted example, or fewer than two "
                                                      "live members to compare"}
                continue
            out[model.name] = mia.lira_attack(scores(evaluation, model, "forget"),
                                              scores(evaluation, model, "test"),
                                              folds=self.cfg.mia_folds, seed=self.cfg.seed)
        return {"lira": out}
