"""Deletion requests from outside a run: `forget`, the ids it takes, their checks, the log.

(The requests a run applies, with their typed sources, are `jaxunlearn.deletion_queue`.)

``forget`` validates the ids against the run (its newest checkpoint and its deletion log) and
records the request in the log before anything else. Then:

* a finished run is locked, reopened at its newest checkpoint, and the request applied at
  once: invalidation, retraining with the run's strategy, a new checkpoint, the purge of every
  kept checkpoint whose lineage holds a deleted id, re-evaluation, ``results.json`` updated,
  and the request's outcome in the log, in that order; a crash anywhere in it is completed the
  next time the run is opened;
* a run in progress (its process holds the lock) picks the request up after its current
  phase; a run that is neither (killed, not finished) applies it when resumed.
"""

from __future__ import annotations

import pathlib
import time
from typing import Callable

from jaxunlearn import checkpoint, deletion_log, driver, plans, runlock, timing
from jaxunlearn.deletion_queue import Forget
from jaxunlearn.folder import RunFolder
from jaxunlearn.results import Report
from jaxunlearn.run import open_run, saved_config


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


def latest_meta(run_dir) -> dict:
    """The JSON part of the run's newest complete checkpoint (the state tree without arrays)."""
    ckpts = checkpoint.Checkpoints(run_dir, read_only=True)
    try:
        for step in reversed(ckpts.steps()):
            try:
                return ckpts.load_meta(step)
            except checkpoint.CheckpointFormatError:
                raise
            except checkpoint.CheckpointError:
                continue
        raise checkpoint.CheckpointError(f"no usable checkpoint in {ckpts.root}")
    finally:
        ckpts.close()


def validate(run_dir, ids: list[int]) -> dict:
    """Checks ``ids`` against the run: they exist, are not deleted or requested already, and
    do not delete every example. Returns the newest checkpoint's state tree (arrays left out)."""
    run_dir = runlock.check_run_dir(run_dir)
    cfg = saved_config(run_dir)
    try:
        tree = latest_meta(run_dir)["tree"]
    except checkpoint.CheckpointError as e:
        raise RequestError(f"{run_dir} has no usable checkpoint to apply a request to: {e}")
    n_train = Report.results_in(tree)["n_train"]
    out_of_range = [i for i in ids if not 0 <= i < n_train]
    if out_of_range:
        raise RequestError(f"example id(s) {out_of_range[:10]} do not exist: this run's "
                           f"training ids are 0..{n_train - 1}")
    pretraining = plans.pretraining_ids(n_train, cfg.pretrain)
    held = [i for i in ids if i in set(pretraining.tolist())]
    if held:
        raise RequestError(
            f"example id(s) {held[:10]} are in this run's pretraining set (ids "
            f"{pretraining[0]}..{pretraining[-1]}, declared never deletable with "
            f"pretrain={cfg.pretrain}): every member starts from a model trained on them, so "
            f"forgetting them means a new run (with pretrain=0, or without these ids)")
    gone = set(tree["deletions"]["ids"])
    if RunFolder(run_dir).deletion_log.exists():
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
    return tree


def forget(run_dir, ids: list[int], log: Callable[[str], None] = print,
           wait: float = 600.0, dataset=None) -> dict:
    """Records and (when the run is not running) applies a deletion request.

    Returns ``{"request", "status": "applied" | "queued", ...}``. Raises RequestError for bad
    ids (nothing recorded)."""
    run_dir, t0, c0 = pathlib.Path(run_dir), time.perf_counter(), timing.compile_seconds()
    tree = validate(run_dir, ids)
    cfg = saved_config(run_dir)
    with deletion_log.DeletionLog.open(run_dir) as requests:
        request_id = requests.request(ids, str(Forget()))
    if tree["progress"]["phase_done"] < cfg.phases:
        try:
            with runlock.run_lock(run_dir, purpose="forget"):
                doing = (f"the run is not finished; `jaxunlearn run --resume {run_dir}` "
                         f"applies request {request_id} when it continues")
        except runlock.RunLocked as e:
            doing = (f"the run is in progress (pid {(e.holder or {}).get('pid')}); it applies "
                     f"request {request_id} after its current phase")
        return {"request": request_id, "status": "queued", "message": doing}

    def reopen(wait_s):
        return open_run(cfg, run_dir, dataset, log, progress=False, purpose="forget",
                        wait=wait_s)

    try:
        run = reopen(0.0)
    except runlock.RunLocked as e:
        holder = e.holder or {}
        if holder.get("purpose") == "run":  # a `run --resume` finishing: it applies it
            return {"request": request_id, "status": "queued",
                    "message": f"the run is open in pid {holder.get('pid')}; it applies "
                               f"request {request_id} before it exits"}
        try:  # another `forget`: wait for it (it may apply this request too)
            run = reopen(wait)
        except runlock.RunLocked as e:
            return {"request": request_id, "status": "queued", "message": str(e)}
    opened = time.perf_counter() - t0 - (timing.compile_seconds() - c0)
    with run:
        if run.state.progress.phase_done < cfg.phases:  # fell back inside the run: not finished
            return {"request": request_id, "status": "queued",
                    "message": "the run is not finished; it applies the request when resumed"}
        results = driver.complete(run)
    mine = next((r for r in results.get("requests", [])
                 if request_id in r.get("together", [r["request"]])), None)
    return {"request": request_id, "status": "applied", "record": mine, "results": results,
            "timing": _timing(run, t0, opened, c0, mine)}


def _timing(run, t0: float, opened: float, c0: float, record: dict | None) -> dict:
    """Where a `forget` call's wall seconds went: ``open`` (checks, the request logged, data,
    the run restored), ``retraining`` (the strategy's training), ``scoring``, ``checkpoint``
    (writes, purge, log outcomes, results file), each without compilation; ``compile`` (all
    of it); ``other`` (the rest: invalidation, snapshots, the end state...); ``honoured``: wall
    seconds until the request was durable, before it was scored; ``scored_rows``:
    member-example logits computed."""
    total = time.perf_counter() - t0
    retraining = ((record or {}).get("cost") or {}).get("seconds") or 0.0
    out = {"total": total, "open": opened, "retraining": retraining,
           "compile": timing.compile_seconds() - c0,
           "scoring": run.spans.seconds.get("scoring", 0.0),
           "checkpoint": run.spans.seconds.get("checkpoint", 0.0)}
    out["other"] = total - sum(v for k, v in out.items() if k != "total")
    out["overhead"] = total - retraining
    out["scored_rows"] = run.logits.rows
    honoured = run.marks.get("honoured")
    out["honoured"] = honoured - t0 if honoured is not None else total
    return out


def log_text(run_dir) -> str:
    """The deletion log as a table."""
    run_dir = runlock.check_run_dir(run_dir)
    if not RunFolder(run_dir).deletion_log.exists():
        return "no deletion requests recorded"
    with deletion_log.DeletionLog.open(run_dir, create=False) as log:
        return deletion_log.format_records(log.records())
