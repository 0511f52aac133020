"""The protocol: train every group phase by phase, score, delete and unlearn, make it durable.

`train_and_evaluate(cfg, workdir)` is the whole experiment, for a new run folder or one to
continue (`resume` reopens one with its saved configuration); the folder's layout is
`jaxunlearn.folder`. `fork` copies a trained run to unlearn it another way.
"""

from __future__ import annotations

import pathlib
import shutil
import time
from typing import Callable

import numpy as np


from jaxunlearn import checkpoint, data as data_lib, deletion_log, durable, faults, metrics
from jaxunlearn import plans, records
from jaxunlearn import runlock
from jaxunlearn import run as run_lib, unlearning
from jaxunlearn.config import FORK_CHANGES, Config, ConfigError, apply_overrides
from jaxunlearn.deletion_queue import Queue
from jaxunlearn.folder import RunFolder
from jaxunlearn.run import Run, open_run, saved_config
from jaxunlearn.unlearning import apply
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


def _tenth(value) -> str:
    """A learning rate (or one per member) divided by 10, as an override's value."""
    values = value if isinstance(value, tuple) else (value,)
    return ",".join(f"{v / 10:g}" for v in values)


def run_protocol(run: Run, stop_after_phase: int | None = None) -> dict:
    """The remaining phases, then the end state and the requests queued meanwhile."""
    cfg, last = run.cfg, run.cfg.phases if stop_after_phase is None else stop_after_phase
    run.disk.take_requests(True)  # `forget` requests logged from now on are this process's
    try:
        while run.state.progress.phase_done < min(last, cfg.phases):
            run_phase(run, run.state.progress.phase_done + 1)
        if run.state.progress.phase_done == cfg.phases:
            complete(run)
        else:
            _drain(run)
    except TrainingDiverged as e:
        steps = run.disk.ckpts.steps()
        message = (f"{e} in phase {run.state.progress.phase_done + 1}; the run stopped. The last "
                   f"good checkpoint is {steps[-1] if steps else 'none'}; resume from it with "
                   f"a lower learning rate: jaxunlearn run --resume {run.out} "
                   f"learning_rate={_tenth(cfg.learning_rate)} --allow-config-change")
        error: records.Error = {"kind": "diverged", "group": e.group, "members": e.members,
                                "phase": run.state.progress.phase_done + 1, "epoch": e.epoch,
                                "step": e.step, "message": message}
        run.state.report.results["error"] = error
        run.state.report.save()
        raise TrainingDiverged(e.group, e.members, e.epoch, e.step, message) from None
    return run.state.report.results


def run_phase(run: Run, phase: int) -> dict:
    """Trains every group on its stages of ``phase`` (from a mid-phase checkpoint's position
    when resumed), scores, applies the deletions due, and makes it durable."""
    cfg, queue = run.cfg, Queue(run.disk.log, run.state.deletions)
    resume, run.state.progress.position = run.state.progress.position, None
    t0, scored = time.perf_counter(), run.eval_seconds()
    record: records.PhaseRecord = resume["record"] if resume else {
        "phase": phase,
        "working_set": int(len(plans.working_set(run.chunks, phase, run.state.deletions.mask)))}
    seconds = record.setdefault("seconds_by_model", {})
    order = list(run.state.units)
    for name, unit in run.state.units.items():
        track, slices = unit.group.track, run.state.stages.slices(unit.group.track)
        for slice_ in range(1, slices + 1):
            start = None
            if resume is not None:  # skip the stages the checkpoint had finished
                if (order.index(name), slice_) < (order.index(resume["source"]), resume["slice"]):
                    continue
                stage = run.state.stages.get(track, (phase - 1) * slices + slice_)
                start, resume = Start(resume["epoch"], resume["step"], resume["loss"]), None
            else:
                stage = run.state.stages.draw(track, phase, slice_, run.state.deletions.mask)
            everyone = np.ones(unit.group.members, bool)
            cost = run.trainer.train(unit.group, stage, everyone, start=start,
                                     on_step=_step_hook(run, phase, name, slice_, record))
            seconds[track] = seconds.get(track, 0.0) + cost.seconds
            run.state.stages.seconds[track][stage.t] = cost.seconds
            run.state.ledger.training += cost
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
    run.state.progress.phase_done = phase
    run.state.report.results["phases"].append(record)
    for request in queue.forgets():
        apply(run, phase, request)
    seconds["evaluation"] = run.eval_seconds() - scored
    record["seconds"] = time.perf_counter() - t0
    run.state.report.phase(record)
    durable.commit(run)
    return record


def complete(run: Run) -> dict:
    """A finished run's end: the requests pending in its log applied, all those pending at
    once together (one deletion, one replay) and made durable before they are scored; then the
    end state written and made durable (the oracle reference included); again while requests
    arrived meanwhile."""
    queue = Queue(run.disk.log, run.state.deletions)
    run.disk.take_requests(True)
    while True:
        pending = list(queue.forgets())
        if not pending and run.state.report.results["complete"]:
            pending = queue.close(run.disk)  # none left: take no more (or one just came)
            if not pending:
                return run.state.report.results
        if pending:
            apply(run, run.cfg.phases, pending, durable_first=True)
        unlearning.finish(run)
        durable.commit(run)


def _drain(run: Run) -> None:
    """A run that stops before its end applies the `forget` requests it took first (as a
    phase's end does), until none is left and it takes no more."""
    queue = Queue(run.disk.log, run.state.deletions)
    while pending := queue.close(run.disk):
        for request in pending:
            apply(run, run.state.progress.phase_done, request)
        durable.commit(run)


def _step_hook(run: Run, phase: int, unit: str, slice_: int, record: dict):
    """The per-step callback of phase training: a mid-phase checkpoint every
    ``checkpoint_every`` optimiser steps."""
    every = run.cfg.checkpoint_every

    def on_step(epoch: int, step: int, partial_loss) -> None:
        run.state.progress.steps_done += 1
        if every and run.state.progress.steps_done % every == 0:
            loss = partial_loss()  # raises TrainingDiverged: never checkpoint a NaN state
            # ("source": the unit training, under the key checkpoints have always used)
            run.state.progress.position = {"phase": phase, "source": unit, "slice": slice_,
                                           "epoch": epoch, "step": step,
                                           "loss": loss.tolist(), "record": record}
            durable.write_checkpoint(run)
            durable.trim(run)  # no deletion happens inside a phase: nothing else to purge
            run.state.progress.position = None
        faults.point("phase.step")

    return on_step


def fork(src, dst, overrides=(), dataset: data_lib.Dataset | None = None,
         log: Callable[[str], None] = print) -> dict:
    """Copies the run in ``src``, which must have deleted nothing yet, into the new folder
    ``dst`` with other unlearning settings (``key=value`` ``overrides`` of `FORK_CHANGES`:
    how deletions are unlearned, evaluated and stored, e.g. ``strategy=finetune``), and brings
    the copy to the same point under them (a finished run is finished again: end state
    scored, a checkpoint written). One trained run can so be unlearned in several ways, each
    copy on its own: the models trained are the same bits. Returns the copy's results."""
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    old = saved_config(src)
    cfg = apply_overrides(old, list(overrides))
    bad = sorted(set(run_lib.config_changes(old, cfg)) - FORK_CHANGES)
    if bad:
        raise ConfigError(f"a fork may change how deletions are unlearned and how the run is "
                          f"evaluated, not {', '.join(bad)} (they change the trained models); "
                          f"start a new run instead")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ConfigError(f"{dst} exists and is not empty; fork into a new folder")
    with runlock.run_lock(src, purpose="fork"):  # no half-written checkpoint is copied
        if deletion_log.has_requests(src):
            raise ConfigError(f"{src} has logged deletion requests: fork a run before its "
                              f"first deletion")
        shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".lock"))
    try:
        with open_run(cfg, dst, dataset, log, progress=False, allow_config_change=True,
                      purpose="fork") as run:
            results = run_protocol(run, run.state.progress.phase_done)
            if run.state.progress.phase_done < cfg.phases:
                durable.commit(run)
            return results
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)  # a failed fork leaves no half run behind
        raise


def discard_unstarted(run_dir) -> bool:
    """Removes the run folder ``run_dir`` if it holds nothing trained: no checkpoint past the
    initial one, no pretraining, no logged request (a new run that failed at once, say out of
    memory in its first step). Returns whether it did."""
    run_dir = pathlib.Path(run_dir)
    if not run_dir.is_dir() or not RunFolder(run_dir).config.is_file():
        return False
    try:
        with runlock.run_lock(run_dir, purpose="discard"):
            cfg = saved_config(run_dir)
            ckpts = checkpoint.Checkpoints(run_dir, read_only=True)
            if cfg.pretrain or (set(ckpts.steps()) | set(ckpts._step_dirs())) - {0}:
                return False
            if deletion_log.has_requests(run_dir):
                return False
            shutil.rmtree(run_dir)
            return True
    except (OSError, ConfigError, runlock.RunLocked):
        return False

