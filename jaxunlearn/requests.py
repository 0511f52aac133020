"""Deletion requests on a run folder: `forget`, `audit` and the deletion log.

``forget`` validates the ids against the run (its newest checkpoint and its deletion log) and
records the request in the log (``deletions.sqlite``) before anything else. Then:

* a finished run is locked, reopened at its newest checkpoint, and the request applied at
  once: invalidation, retraining with the run's strategy, a new checkpoint, the purge of every
  kept checkpoint whose lineage holds a deleted id, re-evaluation, ``results.json`` updated,
  and the request's outcome in the log, in that order; a crash anywhere in it is completed the
  next time the run is opened (`jaxunlearn.experiment.resume`);
* a run in progress (its process holds the lock) picks the request up after its current
  phase; a run that is neither (killed, not finished) applies it when resumed.

``audit`` checks the live state and every kept checkpoint against the log.
"""

from __future__ import annotations

import pathlib
from typing import Callable

import numpy as np

from jaxunlearn import checkpoint, deletion_log, runlock
from jaxunlearn.experiment import baseline_unlearned, lineage_violations, resume, saved_config


class RequestError(ValueError):
    """A deletion request that cannot be applied; nothing was recorded."""


def parse_ids(text: str | None = None, path=None) -> list[int]:
    """Ids from ``"12,345 7"`` and/or a file of ids (commas, spaces or newlines)."""
    tokens = []
    if text:
        tokens += text.replace(",", " ").split()
    if path is not None:
        try:
            tokens += pathlib.Path(path).read_text().replace(",", " ").split()
        except OSError as e:
            raise RequestError(f"cannot read the ids file {path}: {e}") from None
    if not tokens:
        raise RequestError("the request names no ids; give --ids 12,345 or --ids-file FILE")
    ids, bad = [], []
    for token in tokens:
        try:
            ids.append(int(token))
        except ValueError:
            bad.append(token)
    if bad:
        raise RequestError(f"example ids are integers; not integers: {', '.join(bad[:5])}")
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise RequestError(f"id(s) {repeated[:10]} are listed more than once")
    return ids


def _latest_meta(run_dir: pathlib.Path) -> dict:
    ckpts = checkpoint.Checkpoints(run_dir, read_only=True)
    try:
        _, loaded = ckpts.load_latest(lambda s: None, items=("meta",))
    finally:
        ckpts.close()
    return loaded["meta"]


def validate(run_dir, ids: list[int]) -> dict:
    """Checks ``ids`` against the run: they exist, are not deleted or requested already, and
    do not delete every example. Returns the newest checkpoint's meta."""
    run_dir = runlock.check_run_dir(run_dir)
    saved_config(run_dir)
    try:
        meta = _latest_meta(run_dir)
    except checkpoint.CheckpointError as e:
        raise RequestError(f"{run_dir} has no usable checkpoint to apply a request to: {e}")
    n_train = meta["results"]["n_train"]
    out_of_range = [i for i in ids if not 0 <= i < n_train]
    if out_of_range:
        raise RequestError(f"example id(s) {out_of_range[:10]} do not exist: this run's "
                           f"training ids are 0..{n_train - 1}")
    gone = set(meta["deleted"])
    if (run_dir / deletion_log.LOG_NAME).exists():
        with deletion_log.DeletionLog.open(run_dir, create=False) as log:
            gone |= set(log.deleted_ids())
            for pending in log.pending():
                gone |= set(pending["ids"])
    already = sorted(set(ids) & gone)
    if already:
        raise RequestError(f"id(s) {already[:10]} are already deleted (or requested); "
                           f"`jaxunlearn log {run_dir}` lists the requests")
    if len(gone | set(ids)) >= n_train:
        raise RequestError(f"the request would delete every one of the {n_train} training "
                           f"examples")
    return meta


def forget(run_dir, ids: list[int], log: Callable[[str], None] = print,
           wait: float = 600.0, dataset=None) -> dict:
    """Records and (when the run is not running) applies a deletion request.

    Returns ``{"request", "status": "applied" | "queued", ...}``. Raises RequestError for bad
    ids (nothing recorded)."""
    run_dir = pathlib.Path(run_dir)
    meta = validate(run_dir, ids)
    with deletion_log.DeletionLog.open(run_dir) as requests:
        request_id = requests.request(ids, "forget (command)")
    if meta["phase_done"] < meta["config"]["phases"]:
        try:
            with runlock.run_lock(run_dir, purpose="forget"):
                doing = (f"the run is not finished; `jaxunlearn run --resume {run_dir}` "
                         f"applies request {request_id} when it continues")
        except runlock.RunLocked as e:
            doing = (f"the run is in progress (pid {(e.holder or {}).get('pid')}); it applies "
                     f"request {request_id} after its current phase")
        return {"request": request_id, "status": "queued", "message": doing}
    try:
        exp = resume(run_dir, dataset=dataset, log=log, progress=False, purpose="forget")
    except runlock.RunLocked as e:
        holder = e.holder or {}
        if holder.get("purpose") == "run":  # a `run --resume` finishing: it applies it
            return {"request": request_id, "status": "queued",
                    "message": f"the run is open in pid {holder.get('pid')}; it applies "
                               f"request {request_id} before it exits"}
        try:  # another `forget`: wait for it (it may apply this request too)
            exp = resume(run_dir, dataset=dataset, log=log, progress=False,
                         purpose="forget", wait=wait)
        except runlock.RunLocked as e:
            return {"request": request_id, "status": "queued", "message": str(e)}
    try:
        if exp.phase_done < exp.cfg.phases:
            return {"request": request_id, "status": "queued",
                    "message": "the run is not finished; it applies the request when resumed"}
        records = exp.apply_pending()
        exp.finish(exp.elapsed())
    finally:
        exp.close()
    mine = next((r for r in records if r["request"] == request_id), None)
    if mine is None:  # applied by another `forget` that held the lock first
        mine = next((r for r in exp.results.get("requests", []) if r["request"] == request_id),
                    None)
    return {"request": request_id, "status": "applied", "record": mine,
            "results": exp.results}


def audit(run_dir) -> tuple[bool, list[str], str]:
    """Checks that no live lineage and no kept checkpoint holds a deleted id and that every
    logged request was applied. Returns (ok, violation lines, one-line summary)."""
    run_dir = runlock.check_run_dir(run_dir)
    cfg = saved_config(run_dir)
    problems, notes = [], []
    records = []
    if (run_dir / deletion_log.LOG_NAME).exists():
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
        folders = [p for p in ckpts.root.iterdir() if p.is_dir()] if ckpts.root.exists() else []
        on_disk = sorted(int(p.name) for p in folders if p.name.isdigit())
        for step in sorted(set(on_disk) - set(steps)):
            problems.append(f"checkpoint folder {step} is incomplete (a write that never "
                            f"finished); `jaxunlearn run --resume {run_dir}` removes it")
        for tmp in folders:
            if "tmp" in tmp.name:
                problems.append(f"checkpoint folder {tmp.name} is a write that never finished; "
                                f"`jaxunlearn run --resume {run_dir}` removes it")
        metas, lineages = {}, {}
        for step in steps:  # one read (and one checksum pass) per checkpoint
            try:
                loaded = ckpts.load(step, ("meta", "lineage"))
            except checkpoint.CheckpointError as e:
                problems.append(f"{e}: it cannot be audited")
                continue
            metas[step], lineages[step] = loaded["meta"], loaded["lineage"]
        newest = max(metas) if metas else None
        deleted = sorted(set(logged) | (set(metas[newest]["deleted"]) if newest is not None
                                        else set()))
        deleted_arr = np.asarray(deleted, np.int64)
        if newest is not None:
            missing = sorted(set(logged) - set(metas[newest]["deleted"]))
            if missing:
                problems.append(f"the log says ids {missing[:10]} were deleted, but the newest "
                                f"checkpoint ({newest}) has not deleted them")
        unlearned = baseline_unlearned(cfg)
        for step, lineage in lineages.items():
            for where, member, ids in lineage_violations(lineage, deleted_arr, unlearned):
                problems.append(f"checkpoint {step}: {where} member {member} still depends on "
                                f"deleted id(s) {ids[:10]}")
            if not unlearned and "baseline" in lineage and deleted_arr.size:
                held = int(np.asarray(lineage["baseline"]["seen"])[:, deleted_arr].sum())
                if held and step == newest:
                    notes.append(f"note: the baseline is a reference the config does not "
                                 f"unlearn (baseline_unlearning={cfg.baseline_unlearning}); it "
                                 f"holds {held} deleted id(s)")
    finally:
        ckpts.close()
    live = run_dir / "lineage.npz"
    if live.exists() and deleted_arr.size:
        saved = np.load(live)
        for member in np.flatnonzero(saved["lineage"][:, deleted_arr].any(axis=1)):
            problems.append(f"lineage.npz (the finished run's live state): member {member} "
                            f"still depends on a deleted id")
    summary = (f"{'ok' if not problems else 'FAILED'}: {len(records)} request(s) in the log, "
               f"{len(deleted)} deleted id(s), {len(steps)} kept checkpoint(s) checked, "
               f"{len(problems)} violation(s)")
    return not problems, problems + notes, summary


def log_text(run_dir) -> str:
    """The deletion log as a table."""
    run_dir = runlock.check_run_dir(run_dir)
    if not (run_dir / deletion_log.LOG_NAME).exists():
        return "no deletion requests recorded"
    with deletion_log.DeletionLog.open(run_dir, create=False) as log:
        return deletion_log.format_records(log.records())


def summary_line(results: dict) -> str:
    f = results["final"]
    return (f"final: ensemble acc {f['ensemble']['test_accuracy']:.4f}"
            + (f", baseline acc {f['baseline']['test_accuracy']:.4f}" if f["baseline"] else "")
            + f"; {len(results['deleted_ids'])} ids deleted, {results['replacements']} member "
              f"replacements; lineage audit "
              f"{'ok' if results['lineage_audit']['ok'] else 'FAILED'}"
              f"; {results['wall_seconds']:.1f}s")

