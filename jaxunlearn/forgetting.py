"""Deletion requests from outside a run: `forget`, the ids it takes, their checks, the log.

(The requests a run applies, with their typed sources, are `jaxunlearn.deletion_queue`.)

``forget`` checks everything before anything is recorded, then records once, then applies
once:

1. the ids (ASCII integers, no repeats, in range, none never deletable), the run's saved
   configuration and its data (loaded, or the ``dataset`` given, and checked to be the run's:
   a run trained on data passed in memory needs it passed again);
2. the run opened, once, as every command opens it (`jaxunlearn.run.open_run`: locked, its
   checkpoint restored, its deletion log checked against it, a crash's work finished);
3. the request checked against every deletion and request so far and appended to the log in
   one transaction (two processes cannot both pass the check for one id);
4. a finished run applies it at once: invalidation, retraining with the run's strategy, a new
   checkpoint, the purge of every kept checkpoint whose lineage holds a deleted id, the
   request's outcome in the log, then re-evaluation and ``results.json``. A crash anywhere in
   it is completed the next time the run is opened.

When another process holds the run, the request is recorded (checked in the same transaction)
and that process's lock record says, in the same transaction, whether it still takes requests:
a run in progress does (it applies the request after its current phase, or before it exits),
and the request is *taken*. One that no longer does (it is exiting, or it never applies
requests) is waited for (``wait`` seconds), and the request applied here; if it is still busy
then, the request is *queued*: the next open of the run applies it.
"""

from __future__ import annotations

import collections
import re
import time
from typing import Callable

import numpy as np

from jaxunlearn import data as data_lib, deletion_log, driver, plans, runlock, timing
from jaxunlearn.deletion_queue import Forget
from jaxunlearn.folder import RunFolder
from jaxunlearn.run import Run, open_run, run_dataset, saved_config

MAX_IDS_FILE_BYTES = 64 << 20  # 64 MiB: about 8 million ids
_ID = re.compile(r"-?[0-9]+")  # ASCII digits only (int() would take other scripts' digits)


class RequestError(ValueError):
    """A deletion request that cannot be applied; nothing was recorded."""


def parse_ids(text: str | None = None, path=None) -> list[int]:
    """Ids from ``"12,345 7"`` and/or a file of ids (commas, spaces or newlines; at most
    `MAX_IDS_FILE_BYTES`)."""
    tokens = []
    if text:
        tokens += text.replace(",", " ").split()
    if path is not None:
        tokens += _read_ids_file(path).replace(",", " ").split()
    if not tokens:
        raise RequestError("the request names no ids; give --ids 12,345 or --ids-file FILE")
    bad = [token for token in tokens if not _ID.fullmatch(token)]
    if bad:
        raise RequestError(f"example ids are integers in ASCII digits; not integers: "
                           f"{', '.join(repr(b) for b in bad[:5])}")
    ids = [int(token) for token in tokens]
    repeated = sorted(i for i, n in collections.Counter(ids).items() if n > 1)
    if repeated:
        raise RequestError(f"id(s) {repeated[:10]} are listed more than once")
    return ids


def _read_ids_file(path) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_IDS_FILE_BYTES + 1)
    except OSError as e:
        raise RequestError(f"cannot read the ids file {path}: {e}") from None
    if len(raw) > MAX_IDS_FILE_BYTES:
        raise RequestError(f"the ids file {path} is larger than {MAX_IDS_FILE_BYTES >> 20} MiB; "
                           f"split the request into several files")
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise RequestError(f"the ids file {path} is not ASCII text: give ids in ASCII digits "
                           f"separated by commas, spaces or newlines") from None


def checker(ids: list[int], n_train: int, pretrain: int,
            run_dir) -> Callable[[set[int]], None]:
    """Checks what ``ids`` alone can show (they exist; none is never deletable) and returns
    the check that needs the run's deletions: ``check(taken)``, with every id deleted or
    requested so far, raises RequestError when an id is among them or the request would
    delete every deletable example. The log runs it in the transaction that appends the
    request."""
    asked = np.asarray(ids, np.int64)
    out_of_range = asked[(asked < 0) | (asked >= n_train)]
    if out_of_range.size:
        raise RequestError(f"example id(s) {out_of_range[:10].tolist()} do not exist: this "
                           f"run's training ids are 0..{n_train - 1}")
    pretraining = plans.pretraining_ids(n_train, pretrain)
    held = np.intersect1d(asked, pretraining)
    if held.size:
        raise RequestError(
            f"example id(s) {held[:10].tolist()} are in this run's pretraining set (ids "
            f"{pretraining[0]}..{pretraining[-1]}, declared never deletable with "
            f"pretrain={pretrain}): every member starts from a model trained on them, so "
            f"forgetting them means a new run (with pretrain=0, or without these ids)")
    wanted, deletable = set(ids), n_train - pretrain

    def check(taken: set[int]) -> None:
        already = sorted(wanted & taken)
        if already:
            raise RequestError(f"id(s) {already[:10]} are already deleted (or requested); "
                               f"`jaxunlearn log {run_dir}` lists the requests")
        if len(taken | wanted) >= deletable:
            raise RequestError(f"the request would delete every one of the {deletable} "
                               f"deletable training examples")

    return check


def forget(run_dir, ids: list[int], log: Callable[[str], None] = print,
           wait: float = 600.0, dataset: data_lib.Dataset | None = None) -> dict:
    """Records and applies a deletion request (see the module's docstring for the order).

    Returns ``{"request", "status", ...}``: status ``"applied"`` (with the request's
    ``record``, the run's ``results`` and its ``timing``), ``"taken"`` (the process that
    holds the run applies it) or ``"queued"`` (recorded; the next open of the run applies it),
    with a ``message``. Raises RequestError for bad ids, ConfigError or DataError for a run
    that cannot be opened, `jaxunlearn.durable.LogMismatch` for a log that does not match the
    checkpoints: nothing is recorded then.

    ``dataset``: the run's data (`jaxunlearn.data.Dataset`), needed when it was passed in
    memory to train the run; None loads the run's ``data`` setting."""
    if not wait >= 0:  # also NaN
        raise RequestError(f"--wait is a number of seconds >= 0, got {wait!r}")
    run_dir, t0, c0 = runlock.check_run_dir(run_dir), time.perf_counter(), timing.compile_seconds()
    cfg = saved_config(run_dir)
    # The run's data, checked against the run before anything is recorded.
    ds = run_dataset(cfg, run_dir, dataset, limit=False)
    check = checker(ids, len(ds.train_labels[:cfg.train_limit or None]), cfg.pretrain, run_dir)

    def reopen(wait_s: float) -> Run:
        return open_run(cfg, run_dir, ds, log, progress=False, purpose="forget", wait=wait_s)

    try:
        run = reopen(0.0)
    except runlock.RunLocked:
        return _while_held(run_dir, ids, check, reopen, wait, t0, c0)
    try:
        deleted = set(run.state.deletions.ids)
        request_id = run.disk.log.request(ids, str(Forget()),
                                          check=lambda taken: check(taken | deleted))
    except BaseException:
        run.close()  # refused: the lock released, nothing recorded
        raise
    return _apply(run, request_id, t0, c0)


def _while_held(run_dir, ids, check, reopen, wait: float, t0: float, c0: float) -> dict:
    """Another process holds the run: the request recorded, then taken by it, applied here
    once it lets go, or queued."""
    holder: dict = {}

    def check_and_ask(taken: set[int]) -> None:
        check(taken)  # (the holder checked the log against its checkpoint when it opened)
        holder.update(runlock.read_holder(run_dir) or {})

    with deletion_log.DeletionLog.open(run_dir) as requests:
        request_id = requests.request(ids, str(Forget()), check=check_and_ask)
    try:
        # A holder that takes requests applies it, unless it died since (its lock is free).
        run = reopen(0.0 if holder.get("takes_requests") else wait)
    except runlock.RunLocked as e:
        if holder.get("takes_requests"):
            return {"request": request_id, "status": "taken",
                    "message": f"the run is open in pid {holder.get('pid')} "
                               f"({holder.get('purpose')}); it applies request {request_id} "
                               f"before it exits"}
        return {"request": request_id, "status": "queued",
                "message": f"{e}. Request {request_id} waits in the log: the next open of the "
                           f"run applies it (`jaxunlearn run --resume {run_dir}`)"}
    return _apply(run, request_id, t0, c0)


def _apply(run: Run, request_id: int, t0: float, c0: float) -> dict:
    """Applies the pending requests of the open ``run`` (``request_id`` among them), unless
    the run is not finished, and closes it."""
    opened = time.perf_counter() - t0 - (timing.compile_seconds() - c0)
    with run:
        if run.state.progress.phase_done < run.cfg.phases:
            return {"request": request_id, "status": "queued",
                    "message": f"the run is not finished; `jaxunlearn run --resume {run.out}` "
                               f"applies request {request_id} when it continues"}
        try:
            results = driver.complete(run)
        except Exception as e:
            e.add_note(f"Request {request_id} is recorded in the deletion log, not yet applied: "
                       f"the next open of the run applies it (`jaxunlearn run --resume "
                       f"{run.out}`)")
            raise
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
