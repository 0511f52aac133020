"""``scores``: accuracy and mean loss on the forget, retain and test sets.

``forget``: the deleted training examples (all deleted so far), what the model still knows of
what it should forget; ``retain``: the training examples still present (at most
``retain_eval``); ``test``: the test set."""

from __future__ import annotations

from jaxunlearn.evaluators.base import Evaluation, Evaluator

SETS = ("forget", "retain", "test")


class Scores(Evaluator):
    name = "scores"

    def run(self, evaluation: Evaluation) -> dict[str, dict]:
        out = {which: {} for which in SETS}
        for model in evaluation.models:
            for which in SETS:
                out[which][model.name] = evaluation.scores(model, which)[0]
        return out
