"""Recovery of logged deletions: after a run falls back to a checkpoint that predates some
deletions (the newer checkpoints were damaged), the ids its deletion log says were deleted are
deleted again before the run goes on."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from jaxunlearn import checkpoint, durable
from jaxunlearn.deletion_queue import Reapplied, Request, Scheduled, parse_source
from jaxunlearn.unlearning import apply


def reapply_logged_deletions(run, step: int, log: Callable[[str], None]) -> None:
    """After falling back to an older checkpoint: deletes again, at once, the ids the log says
    were deleted but checkpoint ``step`` predates (their checkpoints were damaged)."""
    if run.disk.log is None or jax.process_count() > 1:
        return
    logged, later = set(), set()
    for r in run.disk.log.records():
        if r["outcome"] != "applied":
            continue
        logged |= set(r["ids"])
        source = parse_source(r["source"])
        if isinstance(source, Scheduled) and source.phase > run.state.progress.phase_done:
            later |= set(r["ids"])  # the replayed phase deletes them again itself
    missing = np.asarray(sorted(logged - later - set(run.state.deletions.ids)), np.int64)
    if not missing.size:
        return
    if run.state.progress.position is not None:
        raise checkpoint.CheckpointError(
            f"checkpoint {step} is inside phase {run.state.progress.position['phase']} and "
            f"predates the logged deletion of ids {missing[:10].tolist()}, whose checkpoints are "
            f"damaged; restore them, or start a new run that deletes these ids")
    log(f"checkpoint {step} predates the logged deletion of {missing.size} id(s): "
        f"deleting them again now")
    if run.state.progress.phase_done == 0:  # nothing trained yet: they are simply never drawn
        run.state.deletions.mark(missing)
    else:
        apply(run, run.state.progress.phase_done, Request(None, missing, Reapplied(step)))
    durable.commit(run)
