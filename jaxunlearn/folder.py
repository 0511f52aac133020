"""A run folder's layout: every file and folder a run keeps, named once.

``config.json`` (the settings), ``results.json`` (rewritten atomically after every phase),
``metrics.jsonl`` (one line per epoch and per phase), ``lineage.npz`` (the finished run's live
lineage), ``logits.npz`` (members' cached scores for the next process), ``plots/``,
``checkpoints/`` (orbax, with manifests), ``snapshots/`` (`rewind`'s member states),
``deletions.sqlite`` (the deletion log) and ``.lock`` (the process that has the run).
"""

from __future__ import annotations

import dataclasses
import pathlib

CONFIG, RESULTS, METRICS = "config.json", "results.json", "metrics.jsonl"
LINEAGE, LOGITS, PLOTS = "lineage.npz", "logits.npz", "plots"
CHECKPOINTS, SNAPSHOTS = "checkpoints", "snapshots"
DELETION_LOG, LOCK = "deletions.sqlite", ".lock"


@dataclasses.dataclass(frozen=True)
class RunFolder:
    """The paths of one run folder."""

    root: pathlib.Path

    def __post_init__(self):
        object.__setattr__(self, "root", pathlib.Path(self.root))

    config = property(lambda self: self.root / CONFIG)
    results = property(lambda self: self.root / RESULTS)
    metrics = property(lambda self: self.root / METRICS)
    lineage = property(lambda self: self.root / LINEAGE)
    logits = property(lambda self: self.root / LOGITS)
    plots = property(lambda self: self.root / PLOTS)
    checkpoints = property(lambda self: self.root.resolve() / CHECKPOINTS)  # orbax: absolute
    snapshots = property(lambda self: self.root.resolve() / SNAPSHOTS)
    deletion_log = property(lambda self: self.root / DELETION_LOG)
    lock = property(lambda self: self.root / LOCK)
