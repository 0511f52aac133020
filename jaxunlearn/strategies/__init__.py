"""Unlearning strategies, one module each (`base` holds the protocol).

* ``replace`` (the original study): reinitialise, join the next phase.
* ``rewind`` (SISA): restore the last clean stage and replay, equal to the oracle.
* ``oracle``: retrain everything from scratch, the exact reference.
* ``finetune``, ``neggrad``, ``random_labels`` (`approximate`): train the invalid members
  further so that they forget; cheap, not exact.
* ``salun`` (`salun`): random labels on the weights salient for the forget set; not exact.
* ``scrub`` (`scrub`): a student of the member before unlearning, pushed away from it on the
  forget set and held to it on the retained sample; not exact.

Every module of this package is imported here, and a `Strategy` subclass with a ``name``
registers itself: adding a strategy is adding a file, here or in a module of your own (a
plug-in: `jaxunlearn.plugins`).
"""

from __future__ import annotations

import importlib
import pkgutil

from jaxunlearn.config import Config, choices
from jaxunlearn.strategies.base import REGISTRY, Context, Outcome, Strategy, replay

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from jaxunlearn.strategies.oracle import Oracle, Reference  # noqa: E402
from jaxunlearn.strategies.untouched import Untouched  # noqa: E402

NAMES = tuple(sorted(REGISTRY, key=lambda name: (REGISTRY[name].order, name)))
BASELINE_UNLEARNING = choices("baseline_unlearning")

__all__ = ["Context", "NAMES", "Outcome", "Reference", "Strategy", "for_baseline", "for_run",
           "make", "replay"]


def make(name: str) -> Strategy:
    """The strategy called ``name``; ValueError naming the choices otherwise."""
    if name not in REGISTRY:
        known = tuple(sorted(REGISTRY, key=lambda n: (REGISTRY[n].order, n)))
        raise ValueError(f"unknown unlearning strategy {name!r}; choose one of {known} (a "
                         f"strategy of your own: import its module first, --plugin MODULE)")
    return REGISTRY[name]()


def for_run(cfg: Config) -> dict[str, Strategy]:
    """Each trained group's strategy: the ensemble's (``strategy``) and the baseline's."""
    out = {"ensemble": make(cfg.strategy)}
    if cfg.baseline != "none":
        out["baseline"] = for_baseline(cfg)
    return out


def for_baseline(cfg: Config) -> Strategy:
    """How the baseline is unlearned: retrained from scratch when a deletion hits it
    (``baseline_unlearning=oracle``, or ``auto`` under an ensemble strategy that is itself the
    oracle), else left untouched as the original study's reference."""
    if cfg.baseline_unlearning == "oracle" or (cfg.baseline_unlearning == "auto"
                                               and make(cfg.strategy).reference):
        return Oracle()
    return Untouched()
