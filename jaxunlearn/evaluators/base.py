"""The evaluation protocol: models, example sets, logits computed once, evaluators.

An `Evaluation` holds the models under test (each a group with its live members and its
aggregation) and the example sets (``forget``, ``retain``, ``test``). Evaluators read logits
and per-example scores from it; logits come from a `LogitCache` shared by the whole run, which
computes a member's logits on an example once and again only after the member changed (its
``versions`` entry), so the test logits a phase computed are the "before" scores of its
deletions, and a member that unlearning left alone is not scored again. The run keeps the
current members' logits on disk between processes (`LogitCache.save`, matched back by the
members' fingerprints), so a `forget` request scores only the members it retrained and the ids
it deletes.

An evaluator is a class with a ``name`` whose ``run(evaluation)`` returns ``{block: {model:
metrics}}``; subclasses register themselves and the config's ``evaluators`` setting picks them.
An evaluator owns its settings and checks as a strategy does: ``settings`` declares them
(read as ``self.cfg.NAME``) and `Evaluator.check` refuses a configuration it cannot work with;
one defined in another module is a plug-in (`jaxunlearn.plugins`).
"""

from __future__ import annotations

import json
from typing import ClassVar, Mapping, NamedTuple

import numpy as np

from jaxunlearn import metrics, plans, timing
from jaxunlearn.files import atomic_write
from jaxunlearn.config import Config, declare_class, setting
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
    """Member logits per example, computed once and again only after the member changed (its
    ``versions`` entry), and then for the members and examples missing only (as a stack of
    those members). `save` and `load` carry the current members' rows from one process to the
    next, matched by the members' fingerprints: a `forget` scores only what its request
    changed."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        # group name -> [versions [m], have [m, n] bool, logits [m, n, classes]] (n: resident)
        self._groups: dict[str, list] = {}
        self.seconds = 0.0  # spent computing logits (compilation left out)
        self.rows = 0  # member-example rows computed

    def _entry(self, group: ModelGroup) -> list:
        entry = self._groups.get(group.name)
        n = group.data.n_train + group.data.n_test
        if entry is None or entry[2].shape != (group.members, n, group.classes):
            entry = self._groups[group.name] = [
                np.full(group.members, -1, np.int64), np.zeros((group.members, n), bool),
                np.zeros((group.members, n, group.classes), np.float32)]
        versions, have, _ = entry
        changed = versions != group.versions
        have[changed], versions[changed] = False, group.versions[changed]
        return entry

    def get(self, group: ModelGroup, sets: list[np.ndarray],
            needed: np.ndarray | None = None) -> list[np.ndarray]:
        """Logits ``[m, n, classes]`` of ``group`` on each id array of ``sets`` (resident ids).
        Only members in ``needed`` (bool ``[m]``; all when None) are brought up to date; the
        rows of the others are NaN unless current. What is missing goes through the model in
        one pass."""
        needed = np.ones(group.members, bool) if needed is None else np.asarray(needed, bool)
        _, have, logits = self._entry(group)
        ids = np.unique(np.concatenate([np.asarray(x, np.int64) for x in sets]))
        missing = needed[:, None] & ~have[:, ids]
        if missing.any():
            todo, rows = missing.any(axis=1), ids[missing.any(axis=0)]
            clock = timing.Clock()
            new = group.member_logits(self.batch_size, rows, todo)
            self.seconds += clock.seconds()
            self.rows += int(todo.sum()) * len(rows)
            logits[np.ix_(todo, rows)] = new[todo]
            have[np.ix_(todo, rows)] = True
        out = []
        for x in sets:
            x = np.asarray(x, np.int64)
            known = have[:, x]
            out.append(logits[:, x] if known.all() else
                       np.where(known[..., None], logits[:, x], np.nan).astype(np.float32))
        return out

    def save(self, path, groups: list[ModelGroup], exclude: np.ndarray, meta: dict) -> None:
        """Writes the current rows of ``groups``' members to ``path`` (atomically), keyed by
        their fingerprints, without the training examples in ``exclude`` (bool ``[n_train]``:
        the deleted ones); ``meta`` is stored with them."""
        arrays, fingerprints = {}, {}
        for group in groups:
            if group.name not in self._groups:
                continue
            versions, have, logits = self._groups[group.name]
            keep = have.copy()
            keep[:, :group.data.n_train] &= ~np.asarray(exclude, bool)
            fingerprints[group.name] = group.fingerprints()
            for i in np.flatnonzero((versions == group.versions) & keep.any(axis=1)):
                ids = np.flatnonzero(keep[i])
                arrays[f"{group.name}/{i}/ids"] = ids.astype(np.int32)
                arrays[f"{group.name}/{i}/logits"] = logits[i, ids]
        arrays["meta"] = np.frombuffer(json.dumps(
            {**meta, "fingerprints": fingerprints}).encode(), np.uint8)
        atomic_write(path, lambda f: np.savez(f, **arrays))

    def load(self, path, groups: list[ModelGroup]) -> int:
        """Takes the rows `save` wrote for members whose fingerprints match ``groups``' current
        members; returns how many members it matched (0 when there is no file). Raises
        `CacheError` when the file cannot be read: a caller discards it."""
        try:
            meta, rows = read_saved(path)
        except FileNotFoundError:
            return 0
        matched = 0
        for group in groups:
            now = group.fingerprints()
            _, have, logits = self._entry(group)
            for j, fingerprint in enumerate(meta["fingerprints"].get(group.name, [])):
                if fingerprint in now and (group.name, j) in rows:
                    i, (ids, saved) = now.index(fingerprint), rows[(group.name, j)]
                    logits[i, ids], have[i, ids] = saved, True
                    matched += 1
        return matched


def read_saved(path) -> tuple[dict, dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]]:
    """What `LogitCache.save` wrote: its ``meta`` (with each group's member ``fingerprints``)
    and ``{(group, member): (resident ids, logits)}``. Raises FileNotFoundError for a missing
    file, `CacheError` for one that cannot be read whole (truncated, emptied, foreign)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(bytes(f["meta"]).decode())
            rows = {}
            for key in f.files:
                if key.endswith("/ids"):
                    name, member, _ = key.rsplit("/", 2)
                    rows[(name, int(member))] = (f[key].astype(np.int64),
                                                 np.asarray(f[f"{name}/{member}/logits"]))
            if not isinstance(meta, dict) or not isinstance(meta.get("fingerprints"), dict):
                raise ValueError("no member fingerprints")
    except FileNotFoundError:
        raise
    except Exception as e:  # zip, zlib, npy and JSON readers raise many kinds on damage
        raise CacheError(f"{type(e).__name__}: {e}") from None
    return meta, rows


class CacheError(ValueError):
    """A saved logits file that cannot be read; being a cache, it is discarded."""


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
        return model.group.data.test_ids if which == "test" else self.sets[which][0]

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
    # The evaluator's own settings: {name: config.setting(default, help, **rule)}; a subclass
    # has its bases' too. Every evaluation's: the retained examples scored (`retain_ids`).
    settings: ClassVar[Mapping] = {
        "retain_eval": setting(10000, "retained training examples scored, at most", at_least=1,
                               resume=True)}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            _check_free(REGISTRY, cls, "evaluator")
            REGISTRY[cls.name] = cls
        declare_class(cls, "evaluators", cls.__dict__.get("name", ""))

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def check(self, n_train: int) -> None:
        """Raises ConfigError (saying what to change) when this evaluator cannot work with its
        config and ``n_train`` training examples; its settings' own rules are checked already
        (`jaxunlearn.validation.check` calls this before anything is trained)."""

    def run(self, evaluation: Evaluation) -> dict[str, dict]:
        raise NotImplementedError


# The attacks' cross-validation: declared by each evaluator that uses it.
FOLDS = {"mia_folds": setting(5, "cross-validation folds of the membership-inference attacks",
                              at_least=2, resume=True, compare=True)}


def retain_ids(cfg: Config, chunks: list[np.ndarray], phase: int,
               deleted: np.ndarray) -> np.ndarray:
    """The retained training examples scored after ``phase``: its working set, at most
    ``retain_eval`` of them (a fixed random subset)."""
    working = plans.working_set(chunks, phase, deleted)
    if len(working) <= cfg.retain_eval:
        return working
    # The first retain_eval retained ids of a fixed random order of the phase's examples: a
    # deletion changes the sample by the ids it deletes only (their scores stay cached).
    everyone = np.concatenate(chunks[:phase])
    order = everyone[plans.stream(cfg.seed, "eval", phase).permutation(len(everyone))]
    return np.sort(order[~deleted[order]][:cfg.retain_eval])


def _check_free(registry: dict, cls: type, kind: str) -> None:
    """A name is one plug-in's: another module's class may not take it (a run would record
    the wrong module, and every built-in's user would get it). The same module may define it
    again (a reloaded module, a notebook cell run twice)."""
    old = registry.get(cls.name)
    if old is not None and old.__module__ != cls.__module__:
        raise TypeError(f"the {kind} name {cls.name!r} is taken by "
                        f"{old.__module__}.{old.__qualname__}; give {cls.__qualname__} another "
                        f"name")
