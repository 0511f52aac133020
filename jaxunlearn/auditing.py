"""The audit of a run folder: no live state and no kept checkpoint may hold a deleted id, and
every logged request must have been applied.

A group's lineages are held to that when its strategy unlearns exactly (the strategies say so:
`jaxunlearn.strategies.base.Strategy.exact`). A reference model the config leaves untouched (the
original study's baseline), or a strategy that unlearns approximately, is reported in a note
with the number of deleted ids it holds, not as a violation.
"""

from __future__ import annotations

import numpy as np

from jaxunlearn import checkpoint, deletion_log, durable, plans, runlock, strategies
from jaxunlearn.folder import LOGITS, RunFolder
from jaxunlearn.results import Report


def audit(run_dir) -> tuple[bool, list[str], str]:
    """Checks the run in ``run_dir``. Returns (ok, violation lines then notes, one-line
    summary). Raises CheckpointFormatError for a run written by another version."""
    from jaxunlearn.run import saved_config

    run_dir = runlock.check_run_dir(run_dir)
    cfg = saved_config(run_dir)
    units = strategies.for_run(cfg)
    # The oracle reference is exact by construction (trained without the deleted ids).
    exact = ["oracle"] + [name for name, s in units.items() if s.unlearns and s.exact]
    problems, notes, records = [], [], []
    if RunFolder(run_dir).deletion_log.exists():
        with deletion_log.DeletionLog.open(run_dir, create=False) as log:
            records = log.records()
    for r in records:
        if r["outcome"] == deletion_log.PENDING:
            problems.append(f"request {r['id']} ({len(r['ids'])} ids, {r['source']}) is pending: "
                            f"not applied yet")
    logged = sorted({i for r in records if r["outcome"] == "applied" for i in r["ids"]})
    ckpts = checkpoint.Checkpoints(run_dir, read_only=True)
    try:
        steps = ckpts.steps()
        problems += _unfinished_writes(ckpts, steps, run_dir)
        loaded = {}
        for step in steps:  # one read (and one checksum pass) per checkpoint
            try:
                loaded[step] = ckpts.load_lineages(step)
            except checkpoint.CheckpointFormatError:
                raise
            except checkpoint.CheckpointError as e:
                problems.append(f"{e}: it cannot be audited")
        newest = max(loaded) if loaded else None
        kept = set(loaded[newest][1]["tree"]["deletions"]["ids"]) if newest is not None else set()
        deleted = np.asarray(sorted(set(logged) | kept), np.int64)
        missing = sorted(set(logged) - kept)
        if newest is not None and missing:
            problems.append(f"the log says ids {missing[:10]} were deleted, but the newest "
                            f"checkpoint ({newest}) has not deleted them")
        if newest is not None:
            try:
                durable.check_log(records, loaded[newest][1]["tree"], newest,
                                  RunFolder(run_dir).deletion_log)
            except durable.LogMismatch as e:
                problems.append(str(e))
        for step, (lineages, meta) in loaded.items():
            for where, member, ids in durable.violations(lineages, meta["lineages"], deleted,
                                                         exact):
                problems.append(f"checkpoint {step}: {where} member {member} still depends on "
                                f"deleted id(s) {ids[:10]}")
        if newest is not None:
            notes += _notes(cfg, units, loaded[newest], deleted)
            problems += _pretraining(cfg, loaded[newest][1]["tree"], deleted)
        problems += _unnamed_snapshots(run_dir, units, [meta for _, meta in loaded.values()])
    finally:
        ckpts.close()
    live = RunFolder(run_dir).lineage
    if live.exists() and deleted.size and "ensemble" in exact:
        try:
            with np.load(live, allow_pickle=False) as saved:
                held = np.asarray(saved["lineage"])[:, deleted].any(axis=1)
        except Exception as e:  # zip, zlib and npy readers raise many kinds on damage
            problems.append(f"{live.name} (the finished run's live lineage) cannot be read "
                            f"({type(e).__name__}: {e}); `jaxunlearn run --resume {run_dir}` "
                            f"writes it again from the newest checkpoint")
            held = np.zeros(0, bool)
        for member in np.flatnonzero(held):
            problems.append(f"lineage.npz (the finished run's live state): member {member} "
                            f"still depends on a deleted id")
    problems += _saved_logits(run_dir, deleted)
    summary = (f"{'ok' if not problems else 'FAILED'}: {len(records)} request(s) in the log, "
               f"{len(deleted)} deleted id(s), {len(steps)} kept checkpoint(s) checked, "
               f"{len(problems)} violation(s)")
    return not problems, problems + notes, summary


def _pretraining(cfg, tree: dict, deleted: np.ndarray) -> list[str]:
    """With a pretrained initialisation, no deleted id may be one it was trained on (the
    examples the config declares never deletable)."""
    if not cfg.pretrain:
        return []
    pretraining = plans.pretraining_ids(Report.results_in(tree)["n_train"], cfg.pretrain)
    held = np.intersect1d(deleted, pretraining)
    return [f"deleted id(s) {held[:10].tolist()} are in the pretraining set (ids "
            f"{pretraining[0]}..{pretraining[-1]}): every member started from a model "
            f"trained on them"] if held.size else []


def _saved_logits(run_dir, deleted: np.ndarray) -> list[str]:
    """The saved logits (``logits.npz``) must hold no score of a deleted id and must
    have been written after the last deletion (earlier ones may be invalidated members')."""
    from jaxunlearn.evaluators import read_saved
    path = RunFolder(run_dir).logits
    if not path.exists():
        return []
    try:
        meta, rows = read_saved(path)
        held = sorted(set().union(*(ids.tolist() for ids, _ in rows.values()))
                      & set(deleted.tolist()))
    except (OSError, ValueError, KeyError) as e:
        return [f"{LOGITS} cannot be read ({e}): it may hold any score; remove it (it is only a "
                f"cache), or open the run (`jaxunlearn run --resume {run_dir}`), which "
                f"discards it"]
    out = []
    if held:
        out.append(f"{LOGITS} holds scores of deleted id(s) {held[:10]}")
    if meta.get("deleted") != len(deleted):
        out.append(f"{LOGITS} was written with {meta.get('deleted')} id(s) deleted, not "
                   f"{len(deleted)}: it may hold scores of invalidated members; remove it")
    return out


def _unfinished_writes(ckpts, steps, run_dir) -> list[str]:
    folders = [p for p in ckpts.root.iterdir() if p.is_dir()] if ckpts.root.exists() else []
    on_disk = sorted(int(p.name) for p in folders if p.name.isdigit())
    out = [f"checkpoint folder {step} is incomplete (a write that never finished); "
           f"`jaxunlearn run --resume {run_dir}` removes it"
           for step in sorted(set(on_disk) - set(steps))]
    out += [f"checkpoint folder {tmp.name} is a write that never finished; "
            f"`jaxunlearn run --resume {run_dir}` removes it"
            for tmp in folders if "tmp" in tmp.name]
    return out


def _unnamed_snapshots(run_dir, units, metas) -> list[str]:
    """Snapshots on disk that no kept checkpoint names: their lineage is unknown to the
    audit, so they may hold a deleted id (a write a crash left, or a purge that stopped)."""
    from jaxunlearn.snapshots import SnapshotStore
    from jaxunlearn.strategies.oracle import Reference

    named = set()
    for meta in metas:
        tree = meta["tree"]
        for name, strategy in units.items():
            named |= strategy.snapshot_names(tree["strategies"][name])
        named |= Reference(units["ensemble"]).snapshot_names(tree["reference"])
    return [f"snapshot {name} is not named by any kept checkpoint (a write or purge that did "
            f"not finish); `jaxunlearn run --resume {run_dir}` removes it"
            for name in sorted(SnapshotStore(run_dir, read_only=True).names() - named)]


def _notes(cfg, units, newest, deleted) -> list[str]:
    """What the groups not held to exactness still hold, in the newest checkpoint."""
    lineages, meta = newest
    out = []
    for entry in meta["lineages"]:
        strategy = units.get(entry["group"])
        if strategy is None or (strategy.unlearns and strategy.exact) or not deleted.size:
            continue
        held = int(np.asarray(lineages[entry["where"]])[:, deleted].sum())
        if not held:
            continue
        if not strategy.unlearns:
            out.append(f"note: the {entry['where']} is a reference the config does not unlearn "
                       f"(baseline_unlearning={cfg.baseline_unlearning}); it holds {held} "
                       f"deleted id(s)")
        else:
            out.append(f"note: strategy {strategy.name} unlearns approximately: the "
                       f"{entry['where']} holds {held} deleted id(s) by design")
    return out
