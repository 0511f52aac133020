"""Evaluators of unlearning, one module each (`base` holds the protocol), chosen by the
config's ``evaluators`` setting (comma-separated names, in the order they run).

* ``scores``: forget, retain and test accuracy and loss;
* ``mia``: loss-based membership inference, forget vs test;
* ``lira``: per-example membership inference (offline LiRA) from the ensemble's own members;
* ``lira_online``: online LiRA for unlearning (U-LiRA): each example's in- and out-members.
"""

from __future__ import annotations

import importlib
import pkgutil

from jaxunlearn.config import Config
from jaxunlearn.evaluators.base import (REGISTRY, Evaluation, Evaluator, LogitCache, Model,
                                        CacheError, read_saved, retain_ids)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

NAMES = tuple(REGISTRY)

__all__ = ["CacheError", "Evaluation", "Evaluator", "LogitCache", "Model", "NAMES", "make",
           "evaluate", "read_saved", "retain_ids"]


def names(cfg: Config) -> list[str]:
    """The evaluators the config names; ValueError for an unknown one."""
    chosen = [n.strip() for n in cfg.evaluators.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown evaluator(s) {unknown} in evaluators={cfg.evaluators!r}; "
                         f"choose from {', '.join(REGISTRY)} (comma-separated; an evaluator of "
                         f"your own: import its module first, --plugin MODULE)")
    return chosen


def make(cfg: Config) -> list[Evaluator]:
    return [REGISTRY[n](cfg) for n in names(cfg)]


def evaluate(evaluators: list[Evaluator], evaluation: Evaluation) -> dict[str, dict]:
    """Every evaluator's blocks, in order."""
    blocks: dict[str, dict] = {}
    for evaluator in evaluators:
        blocks.update(evaluator.run(evaluation))
    return blocks
