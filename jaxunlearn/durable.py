"""A run's durable state on disk: the checkpoint of its state tree (`jaxunlearn.run.RunState`),
the purge of kept checkpoints and snapshots that depend on a deleted id, and the commit
sequence that makes a phase or a deletion durable.

Snapshots that strategies keep on disk (`jaxunlearn.snapshots`) are named in the tree; one that
neither the live state nor a kept checkpoint names is deleted with the purge.
"""

from __future__ import annotations

import pathlib

import numpy as np

from jaxunlearn import checkpoint, faults
from jaxunlearn.deletion_log import DeletionLogError


class LogMismatch(DeletionLogError):
    """The deletion log lacks requests that a checkpoint applied: it was emptied, deleted or
    replaced by an older copy of itself. Nothing is changed; the message says what to do."""


def check_log(records: list[dict], tree: dict, step: int, path) -> None:
    """Raises `LogMismatch` when the log ``records`` (at ``path``) lack what checkpoint
    ``step`` (its state ``tree``) applied: a request it applied (by identity), or a deleted
    id no logged request names (every deletion a run makes is logged before it is
    applied)."""
    keys = {r["key"] for r in records}
    lost = [key for key in tree["deletions"]["applied"] if key not in keys]
    unlogged = sorted(set(tree["deletions"]["ids"]) - {i for r in records for i in r["ids"]})
    if not lost and not unlogged:
        return
    what = []
    if lost:
        what.append(f"{len(lost)} of the {len(tree['deletions']['applied'])} request(s) it "
                    f"applied are not in the log")
    if unlogged:
        what.append(f"deleted id(s) {unlogged[:10]} are in no logged request")
    raise LogMismatch(
        f"the deletion log {path} lacks what checkpoint {step} applied ({'; '.join(what)}): it "
        f"was emptied, deleted or replaced by an older copy, and the history of what was "
        f"deleted would be lost. Nothing was changed. Put back the deletion log that goes "
        f"with this run (a backup of {pathlib.Path(path).name}) and run the command again")


def lineage_index(run) -> list[dict]:
    """Where the state tree holds lineage matrices: the live groups' and those their strategies
    keep (rewind snapshots), each ``{"where", "group", "path"}``."""
    out = []
    for name, unit in run.state.units.items():
        out.append({"where": "live ensemble" if name == "ensemble" else name, "group": name,
                    "path": ["groups", name, "lineage", "seen"]})
        for where, path in unit.strategy.lineage_paths(unit.state).items():
            out.append({"where": where, "group": name,
                        "path": ["strategies", name, *map(str, path)]})
    for where, path in run.state.reference.lineage_paths().items():
        out.append({"where": where, "group": "oracle", "path": ["reference", *map(str, path)]})
    return out


def snapshot_names(run, tree: dict | None = None) -> set[str]:
    """The snapshots a state tree names (default: the live state's)."""
    if tree is None:  # (the states only: no collective gathering of parameters)
        states = {name: unit.state for name, unit in run.state.units.items()}
        reference = {"strategy": run.state.reference.state}
    else:
        states, reference = tree["strategies"], tree["reference"]
    names = set().union(*(unit.strategy.snapshot_names(states[name])
                          for name, unit in run.state.units.items() if name in states))
    return names | run.state.reference.snapshot_names(reference)


def violations(lineages: dict[str, np.ndarray], index: list[dict], deleted: np.ndarray,
               checked_groups) -> list[tuple[str, int, list[int]]]:
    """``(where, member, ids)`` for each lineage matrix of a group in ``checked_groups`` that
    holds one of the ``deleted`` ids."""
    out = []
    for entry in index:
        if entry["group"] not in checked_groups or not deleted.size:
            continue
        hit = np.asarray(lineages[entry["where"]])[:, deleted]
        for member in np.flatnonzero(hit.any(axis=1)):
            out.append((entry["where"], int(member), deleted[hit[member]].tolist()))
    return out


def write_checkpoint(run) -> int:
    """Writes the next checkpoint. Every process gathers the state (a collective); the primary
    one writes it."""
    run.state.progress.checkpoint += 1
    run.disk.snapshots.wait()  # every snapshot the checkpoint names is complete first
    tree = run.state.state_dict(run.elapsed())
    if run.primary:
        run.disk.ckpts.save(run.state.progress.checkpoint, tree, lineage_index(run))
    return run.state.progress.checkpoint


def trim(run) -> list[int]:
    """Deletes all but the newest ``keep_checkpoints`` complete checkpoints."""
    if not run.primary:
        return []
    old = run.disk.ckpts.steps()[:-run.cfg.keep_checkpoints]
    for step in old:
        run.disk.ckpts.delete(step)
    return old


def purge(run) -> list[int]:
    """Deletes every kept checkpoint but the newest whose lineages (of groups whose strategy
    unlearns) hold a deleted id, and all but the newest ``keep_checkpoints``. Returns the
    deleted steps."""
    if not run.primary:
        return []
    purged = trim(run)  # first: no need to read what goes anyway
    deleted = run.state.deletions.sorted_ids()
    checked = ["oracle"] + [name for name, unit in run.state.units.items()
                            if unit.strategy.unlearns]
    for step in run.disk.ckpts.steps()[:-1] if deleted.size else []:
        try:
            lineages, meta = run.disk.ckpts.load_lineages(step)
            dirty = bool(violations(lineages, meta["lineages"], deleted, checked))
        except checkpoint.CheckpointError:
            dirty = True  # unreadable: it cannot be shown clean, so it goes
        if dirty:
            run.disk.ckpts.delete(step)
            purged.append(step)
    used = snapshot_names(run)
    for step in run.disk.ckpts.steps():
        try:
            used |= snapshot_names(run, run.disk.ckpts.load_meta(step)["tree"])
        except checkpoint.CheckpointError:
            pass  # a damaged checkpoint is never restored from: its snapshots may go
    run.disk.snapshots.keep_only(used)
    return purged


def commit(run) -> None:
    """The durable step after a phase or a request: checkpoint, purge, then the deletion log's
    outcomes and the results file (a crash anywhere in it is completed on resume)."""
    with run.spans("checkpoint"):
        _commit(run)


def _commit(run) -> None:
    write_checkpoint(run)
    faults.point("checkpoint.before_purge")
    purged = purge(run)
    if run.primary:  # the live lineage, for `audit`
        run.ensemble.lineage.save(run.disk.folder.lineage, run.state.deletions.ids)
    run.state.report.save()
    run.save_logits()
    complete_requests(run, purged)


def complete_requests(run, purged: list[int]) -> None:
    """Writes the outcome of every logged request the run has applied and the log does not
    know yet."""
    if run.disk.log is None:
        return
    for pending in run.disk.log.pending():
        outcome = run.state.deletions.applied.get(pending["key"])
        if outcome is None:
            continue
        faults.point("forget.before_outcome")
        run.disk.log.outcome(pending["id"], "applied",
                             members_invalidated=outcome["invalidated"],
                             strategy=run.strategy.name, cost=outcome["cost"],
                             checkpoints_purged=[str(p) for p in purged],
                             message=outcome["message"])
