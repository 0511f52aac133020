"""``lira_online``: online LiRA for unlearning (U-LiRA, Hayes et al. 2024) from the ensemble's
own members (`jaxunlearn.mia.online_lira_scores`).

When a deletion is scored "before" unlearning, every member's confidence on the forget set and
on the retained sample, and which of them it trained on, become the reference: for each example,
the members that trained on it give the "in" Gaussian and the others the "out" one. A model is
then scored pair by pair (one of its members, one example), each member against the others'
references only. The members are the pairs of a forgotten example with a member that held it
before unlearning; the non-members are the pairs of a retained example with a member that never
trained on it, before or since (the same members, the same data distribution). Before
unlearning that is Carlini et al.'s online attack; after exact unlearning the forgotten pairs
are out-pairs and score like the non-members (AUC about 0.5); an approximate method that still
remembers scores higher. The spread is over folds split by example. ``pair_accuracy`` gives
the same pairs' accuracy: the members on the forgotten examples they held and on the retained
ones they never saw, which exact unlearning makes about equal (a check that needs no oracle).

It needs each example on both sides, as with ``plan=subset fraction=0.5`` (the ``privacy``
preset); the reference lives in the process that scored the deletion, so a block computed
later (a resumed run's end state) says so instead of a figure."""

from __future__ import annotations

import numpy as np

from jaxunlearn import mia
from jaxunlearn.evaluators.base import FOLDS, Evaluation, Evaluator

MIN_EXAMPLES = 20  # forgotten examples needed for a figure (fewer: the block says so)


class OnlineLiRA(Evaluator):
    name = "lira_online"
    carry_before = True
    settings = FOLDS

    def __init__(self, cfg):
        super().__init__(cfg)
        self.reference: dict | None = None  # from the last "ensemble_before" scoring

    def run(self, evaluation: Evaluation) -> dict[str, dict]:
        forget, retain = evaluation.sets["forget"][0], evaluation.sets["retain"][0]
        ids, n_forget = np.concatenate([forget, retain]), len(forget)
        labels = np.concatenate([evaluation.labels("forget"), evaluation.labels("retain")])
        out = {}
        for model in evaluation.models:
            group = model.group
            live = (np.ones(group.members, bool) if model.live is None
                    else np.asarray(model.live, bool))
            logits = np.concatenate([evaluation.logits(model, "forget"),
                                     evaluation.logits(model, "retain")], axis=1)
            conf = mia.logit_confidence(logits, labels)
            if model.name == "ensemble_before":
                self.reference = {"ids": ids, "members": group.members, "conf": conf,
                                  "held": group.lineage.seen[:, ids].copy(), "live": live}
            ref = self.reference
            if not n_forget or ref is None or not np.array_equal(ref["ids"], ids) or \
                    ref["members"] != group.members:
                out[model.name] = {"n": 0, "skipped": "no reference scored before this "
                                                      "deletion in this process"}
                continue
            targets = group.voters(live) & np.isfinite(conf).all(axis=1)
            scores = mia.online_lira_scores(conf, ref["conf"], ref["held"], targets,
                                            ref["live"])
            held, columns = ref["held"], np.arange(conf.shape[1])
            # Non-members: retained examples the member saw neither before nor now (a member
            # `replace` redrew may have trained on some since).
            now = group.lineage.seen[:, ids]
            pos = targets[:, None] & held & (columns < n_forget)[None, :]
            neg = targets[:, None] & ~held & ~now & (columns >= n_forget)[None, :]
            groups = np.broadcast_to(columns, conf.shape)
            result = mia.grouped_attack(
                scores[pos], groups[pos], scores[neg], groups[neg], folds=self.cfg.mia_folds,
                seed=self.cfg.seed, min_examples=MIN_EXAMPLES)
            # The same pairs' accuracy: a member on the forgotten examples it held, and on the
            # retained examples it never saw (after exact unlearning, about equal).
            hit = np.argmax(np.nan_to_num(logits), axis=-1) == labels[None, :]
            result["pair_accuracy"] = {
                "forgotten": float(hit[pos].mean()) if pos.any() else None,
                "unseen": float(hit[neg].mean()) if neg.any() else None}
            out[model.name] = result
        return {"lira_online": out}
