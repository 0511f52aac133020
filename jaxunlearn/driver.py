"""The protocol: train every group phase by phase, score, delete and unlearn, make it durable.

`train_and_evaluate(cfg, workdir)` is the whole experiment, for a new run folder or one to
continue (`resume` reopens one with its saved configuration). A run folder holds
``config.json``, ``metrics.jsonl`` (one line per epoch and per phase), ``results.json``
(rewritten atomically after every phase, ``"complete": true`` at the end), ``lineage.npz``,
``plots/accuracy_loss.png``, ``checkpoints/`` and the deletion log ``deletions.sqlite``.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

import jax

from jaxunlearn import checkpoint, data as data_lib, durable, faults, metrics, plans, unlearning
from jaxunlearn.config import Config, apply_overrides
from jaxunlearn.requests import Queue, Reapplied, Request, Scheduled, parse_source
from jaxunlearn.run import Run, open_run, saved_config
from jaxunlearn.trainer import Start, TrainingDiverged


def train_and_evaluate(cfg: Config, workdir, dataset: data_lib.Dataset | None = None,
                       log: Callable[[str], None] = print, progress: bool | None = None, *,
                       allow_config_change: bool = False,
                       stop_after_phase: int | None = None) -> dict:
    """Runs the experiment ``cfg`` describes in ``workdir``, from its start or from where a run
    in ``workdir`` stopped, to its end (or to the end of phase ``stop_after_phase``: a run that
    `resume` continues). Returns the results, also written to ``results.json``.

    Args:
      dataset: pre-loaded data (else loaded from ``cfg.data``).
      log: receives one summary line per phase.
      progress: show a progress bar (default: only when stderr is a terminal).
      allow_config_change: let a continued run take the settings that may change mid-run.
    """
    with open_run(cfg, workdir, dataset, log, progress,
                  allow_config_change=allow_config_change) as run:
        return run_protocol(run, stop_after_phase)


def resume(run_dir, overrides=(), allow_config_change: bool = False,
           dataset: data_lib.Dataset | None = None, log: Callable[[str], None] = print,
           progress: bool | None = None, stop_after_phase: int | None = None) -> dict:
    """Continues the run in ``run_dir`` from its newest complete checkpoint with its saved
    configuration (``key=value`` ``overrides`` need ``allow_config_change``); on a finished
    run, applies its queued deletion requests."""
    cfg = apply_overrides(saved_config(run_dir), list(overrides))
    return train_and_evaluate(cfg, run_dir, dataset, log, progress,
                              allow_config_change=allow_config_change,
                              stop_after_phase=stop_after_phase)


def run_protocol(run: Run, stop_after_phase: int | None = None) -> dict:
    """The remaining phases, then the end state and the requests queued meanwhile."""
    cfg, last = run.cfg, run.cfg.phases if stop_after_phase is None else stop_after_phase
    try:
        while run.progress.phase_done < min(last, cfg.phases):
            run_phase(run, run.progress.phase_done + 1)
        if run.progress.phase_done == cfg.phases:
            complete(run)
    except TrainingDiverged as e:
        steps = run.ckpts.steps()
        message = (f"{e} in phase {run.progress.phase_done + 1}; the run stopped. The last "
                   f"good checkpoint is {steps[-1] if steps else 'none'}; resume from it with "
                   f"a lower learning rate: jaxunlearn run --resume {run.out} "
                   f"learning_rate={cfg.learning_rate / 10:g} --allow-config-change")
        run.report.results["error"] = {"kind": "diverged", "group": e.group,
                                       "members": e.members, "phase": run.progress.phase_done + 1,
                                       "epoch": e.epoch, "step": e.step, "message": message}
        run.report.save()
        raise TrainingDiverged(e.group, e.members, e.epoch, e.step, message) from None
    return run.report.results


def run_phase(run: Run, phase: int) -> dict:
    """Trains every group on its stages of ``phase`` (from a mid-phase checkpoint's position
    when resumed), scores, applies the deletions due, and makes it durable."""
    cfg, queue = run.cfg, Queue(run.log, run.deletions)
    resume, run.progress.position = run.progress.position, None
    t0, scored = time.perf_counter(), run.eval_seconds()
    record = resume["record"] if resume else {"phase": phase, "working_set": int(
        len(plans.working_set(run.chunks, phase, run.deletions.mask)))}
    seconds = record.setdefault("seconds_by_model", {})
    order = list(run.units)
    for name, unit in run.units.items():
        source, slices = unit.group.source, run.stages.slices(unit.group.source)
        for slice_ in range(1, slices + 1):
            start = None
            if resume is not None:  # skip the stages the checkpoint had finished
                if (order.index(name), slice_) < (order.index(resume["source"]), resume["slice"]):
                    continue
                stage = run.stages.get(source, (phase - 1) * slices + slice_)
                start, resume = Start(resume["epoch"], resume["step"], resume["loss"]), None
            else:
                stage = run.stages.draw(source, phase, slice_, run.deletions.mask)
            everyone = np.ones(unit.group.members, bool)
            cost = run.trainer.train(unit.group, stage, everyone, start=start,
                                     on_step=_step_hook(run, phase, name, slice_, record))
            seconds[source] = seconds.get(source, 0.0) + cost.seconds
            run.stages.seconds[source][stage.t] = cost.seconds
            run.ledger.training += cost
            unit.state = unit.strategy.after_stage(unit.state, run.context(unit), stage, everyone)
            if name == "ensemble":
                record["sample_size"] = int(round(np.mean([len(x) for x in stage.samples])))

    ens, labels = run.ensemble, run.test_labels
    test = run.test_logits(ens)
    record["ensemble"] = metrics.aggregate(test, labels, ens.voters(), cfg.aggregation)
    record["aggregations"] = {a: metrics.aggregate(test, labels, ens.voters(), a)
                              for a in metrics.AGGREGATIONS}
    record["baseline"] = (metrics.score(run.test_logits(run.baseline)[0], labels)
                          if run.baseline else None)
    scheduled = queue.scheduled(phase)
    invalid = ens.lineage.invalid(scheduled.ids)
    record["deleted_ids"] = scheduled.ids.tolist()
    record["invalidated"] = np.flatnonzero(invalid).tolist()
    record["members"] = unlearning.member_records(test, labels, ~invalid, ens)
    if scheduled.ids.size:
        blocks = apply(run, phase, scheduled)
        if blocks["cost"]["member_epochs"]:
            seconds["unlearning"] = blocks["cost"]["seconds"]
        record.update(blocks)
    run.progress.phase_done = phase
    run.report.results["phases"].append(record)
    for request in queue.forgets():
        apply(run, phase, request)
    seconds["evaluation"] = run.eval_seconds() - scored
    record["seconds"] = time.perf_counter() - t0
    run.report.phase(record)
    durable.commit(run)
    return record


def apply(run: Run, phase: int, request: Request | list[Request],
          durable_first: bool = False) -> dict:
    """Applies a request (or several together: one deletion of all their ids) after
    ``phase``: its ids not deleted yet are invalidated, unlearned with the run's strategy and
    scored. A scheduled deletion returns its blocks for the phase's record; any other goes into
    ``results["requests"]`` (one record, listing every request applied in it). ``durable_first``:
    the deletion is made durable (`durable.commit`: checkpoint, purge, the log's outcomes) as
    soon as its ids are unlearned, and scored after that; ``run.marks["honoured"]`` says when."""
    together = request if isinstance(request, list) else [request]
    first = together[0]
    ids = np.setdiff1d(np.concatenate([r.ids for r in together]),
                       run.deletions.ids).astype(np.int64)
    invalid = run.ensemble.lineage.invalid(ids)
    scheduled = isinstance(first.source, Scheduled)
    record = {} if scheduled else {
        "request": first.id, "phase": phase, "ids": ids.tolist(),
        "source": str(first.source), "invalidated": np.flatnonzero(invalid).tolist(),
        **({"together": [r.id for r in together]} if len(together) > 1 else {})}

    def honoured(record: dict) -> None:
        cost = record.get("cost", {})
        for r in together:
            if r.id is None:
                continue
            others = [o.id for o in together if o is not r]
            run.deletions.applied[r.id] = {
                "invalidated": np.flatnonzero(invalid).tolist(),
                "cost": {k: cost.get(k) for k in ("member_epochs", "member_examples", "seconds")},
                "message": "; ".join(
                    ([] if np.setdiff1d(r.ids, ids).size < len(r.ids) else
                     ["nothing left to delete: already deleted"])
                    + ([f"applied in one deletion with request(s) {others}"] if others else []))}
        if not scheduled:
            run.report.results.setdefault("requests", []).append(record)
        if durable_first:
            durable.commit(run)
            run.marks["honoured"] = time.perf_counter()

    if ids.size:
        return unlearning.delete(run, phase, ids, invalid, scheduled, record, honoured)
    honoured(record)
    return record


def complete(run: Run) -> dict:
    """A finished run's end: the requests pending in its log applied, all those pending at
    once together (one deletion, one replay) and made durable before they are scored; then the
    end state written and made durable (the oracle reference included); again while requests
    arrived meanwhile."""
    queue = Queue(run.log, run.deletions)
    while True:
        pending = list(queue.forgets())
        if pending:
            apply(run, run.cfg.phases, pending, durable_first=True)
        elif run.report.results["complete"]:
            return run.report.results
        unlearning.finish(run)
        durable.commit(run)


def reapply_logged_deletions(run: Run, step: int, log: Callable[[str], None]) -> None:
    """After falling back to an older checkpoint: deletes again, at once, the ids the log says
    were deleted but checkpoint ``step`` predates (their checkpoints were damaged)."""
    if run.log is None or jax.process_count() > 1:
        return
    logged, later = set(), set()
    for r in run.log.records():
        if r["outcome"] != "applied":
            continue
        logged |= set(r["ids"])
        source = parse_source(r["source"])
        if isinstance(source, Scheduled) and source.phase > run.progress.phase_done:
            later |= set(r["ids"])  # the replayed phase deletes them again itself
    missing = np.asarray(sorted(logged - later - set(run.deletions.ids)), np.int64)
    if not missing.size:
        return
    if run.progress.position is not None:
        raise checkpoint.CheckpointError(
            f"checkpoint {step} is inside phase {run.progress.position['phase']} and predates "
            f"the logged deletion of ids {missing[:10].tolist()}, whose checkpoints are "
            f"damaged; restore them, or start a new run that deletes these ids")
    log(f"checkpoint {step} predates the logged deletion of {missing.size} id(s): "
        f"deleting them again now")
    if run.progress.phase_done == 0:  # nothing trained yet: they are simply never drawn
        run.deletions.mark(missing)
    else:
        apply(run, run.progress.phase_done, Request(None, missing, Reapplied(step)))
    durable.commit(run)


def _step_hook(run: Run, phase: int, source: str, slice_: int, record: dict):
    """The per-step callback of phase training: a mid-phase checkpoint every
    ``checkpoint_every`` optimiser steps."""
    every = run.cfg.checkpoint_every

    def on_step(epoch: int, step: int, partial_loss) -> None:
        run.progress.steps_done += 1
        if every and run.progress.steps_done % every == 0:
            loss = partial_loss()  # raises TrainingDiverged: never checkpoint a NaN state
            run.progress.position = {"phase": phase, "source": source, "slice": slice_,
                                     "epoch": epoch, "step": step, "loss": loss.tolist(),
                                     "record": record}
            durable.write_checkpoint(run)
            durable.trim(run)  # no deletion happens inside a phase: nothing else to purge
            run.progress.position = None
        faults.point("phase.step")

    return on_step
