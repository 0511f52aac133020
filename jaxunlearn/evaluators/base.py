"""The evaluation protocol: models, example sets, logits computed once, evaluators.

An `Evaluation` holds the models under test (each a group with its live members and its
aggregation) and the example sets (``forget``, ``retain``, ``test``). Evaluators read logits
and per-example scores from it; logits come from a `LogitCache` shared by the whole run, which
computes a member's logits on a set once and again only after the member changed (its
``versions`` entry), so the test logits a phase computed are the "before" scores of its
deletions, and a member that unlearning left alone is not scored again.

An evaluator is a class with a ``name`` whose ``run(evaluation)`` returns ``{block: {model:
metrics}}``; subclasses register themselves and the config's ``evaluators`` setting picks them.
"""

from __future__ import annotations

import hashlib
from typing import ClassVar, NamedTuple

import numpy as np

from jaxunlearn import metrics, plans, timing
from jaxunlearn.config import Config
from jaxunlearn.group import ModelGroup

REGISTRY: dict[str, type["Evaluator"]] = {}


class Model(NamedTuple):
    """A model under test: ``live`` (bool ``[m]``, None for all) members of ``group``,
    aggregated by ``method``."""

    name: str
    group: ModelGroup
    live: np.ndarray | None
    method: str


class LogitCache:
    """Member logits per (group, example set), recomputed only for members that changed, and
    for those only (as a stack of their own)."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self._rows: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}  # -> (versions, logits)
        self.seconds = 0.0  # spent computing logits (compilation left out)

    @staticmethod
    def _key(group: ModelGroup, ids: np.ndarray) -> tuple:
        ids = np.ascontiguousarray(ids, np.int64)
        return group.name, hashlib.sha1(ids.tobytes()).hexdigest()

    def get(self, group: ModelGroup, sets: list[np.ndarray],
            needed: np.ndarray | None = None) -> list[np.ndarray]:
        """Logits ``[m, n, classes]`` of ``group`` on each id array of ``sets`` (resident ids).
        Only members in ``needed`` (bool ``[m]``; all when None) are brought up to date; the
        rows of the others are NaN unless current. The members and sets to compute go through
        the model in one pass."""
        needed = np.ones(group.members, bool) if needed is None else np.asarray(needed, bool)
        keys = [self._key(group, ids) for ids in sets]
        stale = {}
        for i, key in enumerate(keys):
            versions = self._rows[key][0] if key in self._rows else None
            todo = needed if versions is None else needed & (versions != group.versions)
            if todo.any():
                stale[i] = todo
        if stale:
            todo = np.logical_or.reduce(list(stale.values()))
            ids = [np.asarray(sets[i]) for i in stale]
            clock = timing.Clock()
            logits = group.member_logits(self.batch_size, np.concatenate(ids), todo)
            self.seconds += clock.seconds()
            bounds = np.cumsum([0] + [len(x) for x in ids])
            for n, i in enumerate(stale):
                new = logits[:, bounds[n]:bounds[n + 1]]
                if keys[i] in self._rows:
                    versions, old = self._rows[keys[i]]
                    new = np.where(todo[:, None, None], new, old)
                    versions = np.where(todo, group.versions, versions)
                else:
                    versions = np.where(todo, group.versions, -1)
                self._rows[keys[i]] = (versions, new)
        out = []
        for key in keys:
            versions, logits = self._rows[key]
            current = versions == group.versions
            out.append(logits if current.all() else
                       np.where(current[:, None, None], logits, np.nan).astype(logits.dtype))
        return out


class Evaluation:
    """The models and example sets of one evaluation, with memoised scores."""

    def __init__(self, cache: LogitCache, models: list[Model], forget: np.ndarray,
                 retain: np.ndarray, train_labels: np.ndarray, test_labels: np.ndarray):
        self.cache, self.models = cache, models
        self.sets = {"forget": (forget, train_labels[forget]),
                     "retain": (retain, train_labels[retain])}
        self.test_labels = test_labels
        self._scores: dict[tuple[str, str], tuple] = {}

    def _ids(self, model: Model, which: str) -> np.ndarray:
        return model.group.test_ids if which == "test" else self.sets[which][0]

    def labels(self, which: str) -> np.ndarray:
        return self.test_labels if which == "test" else self.sets[which][1]

    def logits(self, model: Model, which: str) -> np.ndarray:
        """``model``'s member logits ``[m, n, classes]`` on set ``which``."""
        names = ("forget", "retain", "test")  # fetched together: one pass for a tiny forget set
        got = self.cache.get(model.group, [self._ids(model, w) for w in names], model.live)
        return got[names.index(which)]

    def scores(self, model: Model, which: str) -> tuple[dict, np.ndarray | None]:
        """``({"accuracy", "loss", "n"}, per-example loss)`` of ``model`` on set ``which``
        (`jaxunlearn.metrics.evaluate`)."""
        key = (model.name, which)
        if key not in self._scores:
            self._scores[key] = metrics.evaluate(self.logits(model, which), self.labels(which),
                                                 model.group.voters(model.live), model.method)
        return self._scores[key]


class Evaluator:
    """One evaluation: ``run`` returns ``{block: {model name: metrics}}``."""

    name: ClassVar[str]
    # Whether the run's final results repeat this evaluator's "ensemble_before" of the last
    # deletion (what unlearning started from).
    carry_before: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            REGISTRY[cls.name] = cls

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def run(self, evaluation: Evaluation) -> dict[str, dict]:
        raise NotImplementedError


def retain_ids(cfg: Config, chunks: list[np.ndarray], phase: int,
               deleted: np.ndarray) -> np.ndarray:
    """The retained training examples scored after ``phase``: its working set, at most
    ``retain_eval`` of them (a fixed random subset)."""
    working = plans.working_set(chunks, phase, deleted)
    if len(working) <= cfg.retain_eval:
        return working
    rng = plans.stream(cfg.seed, "eval", phase)
    return np.sort(rng.choice(working, cfg.retain_eval, replace=False))
