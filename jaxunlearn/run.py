"""A run: its components, and the one "restore or initialise" path that opens it.

`open_run` checks everything that can be checked (config, data, deletion schedule, an existing
run's configuration and data), locks the run folder, builds the components, and then either
writes checkpoint 0 of a new run or puts an existing run back in the state of its newest
complete checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import pathlib
import platform
import sys
import time
from typing import Callable

import jax
import numpy as np

from jaxunlearn import config as config_lib, data as data_lib
from jaxunlearn import deletions as deletions_lib, durable, evaluators, plans, strategies, timing
from jaxunlearn import plugins, pretraining, records, recovery, rundisk, runlock, validation
from jaxunlearn.config import RESUMABLE_CHANGES, UNLEARNING_CHANGES, Config, ConfigError
from jaxunlearn.group import ModelGroup
from jaxunlearn.ledger import Ledger
from jaxunlearn.results import EpochLog, Report
from jaxunlearn.stages import Stages
from jaxunlearn.trainer import Trainer
from jaxunlearn.files import atomic_write
from jaxunlearn.folder import RunFolder


@dataclasses.dataclass
class Unit:
    """A trained group with the strategy that unlearns it and that strategy's state."""

    group: ModelGroup
    strategy: strategies.Strategy
    state: dict


@dataclasses.dataclass
class Progress:
    """Where a run stands: phases done (deletions included), a mid-phase checkpoint's position,
    optimiser steps of phase training so far, the last checkpoint written, seconds worked."""

    phase_done: int = 0
    position: dict | None = None
    steps_done: int = 0
    checkpoint: int = -1
    elapsed: float = 0.0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclasses.dataclass
class RunState:
    """What a checkpoint holds: every part of a run that training and unlearning change. Each
    part writes and reads its own piece of the state tree (``state_dict``/``load_state_dict``),
    so a checkpoint is never assembled field by field.

    The tree: ``groups`` (each group's stacked state and lineage), ``strategies`` (each group's
    strategy state), ``reference`` (the oracle reference, when kept), ``stages``,
    ``deletions``, ``ledger``, ``report`` and ``progress``."""

    units: dict[str, Unit]  # "ensemble" (and "baseline"): a group, its strategy and its state
    reference: strategies.Reference  # the oracle reference the strategies may keep
    stages: Stages  # what each group trained on, stage by stage
    deletions: deletions_lib.Deletions  # the deleted ids, the schedule, the requests applied
    ledger: Ledger  # training and unlearning costs so far
    report: Report  # results.json and the metrics log
    progress: Progress  # where the run stands

    def state_dict(self, elapsed: float) -> dict:
        """The whole state, as the checkpoint stores it; ``elapsed``: seconds worked so far."""
        return {"groups": {name: unit.group.state_dict() for name, unit in self.units.items()},
                "strategies": {name: unit.state for name, unit in self.units.items()},
                "reference": self.reference.state_dict(),
                "stages": self.stages.state_dict(),
                "deletions": self.deletions.state_dict(),
                "ledger": self.ledger.state_dict(),
                "report": self.report.state_dict(),
                "progress": {**self.progress.state_dict(), "elapsed": elapsed}}

    def load_state_dict(self, tree: dict, context: strategies.Context) -> None:
        """Back to the state ``tree`` (from `state_dict`) describes; ``context``: the
        ensemble's strategy context (the oracle reference rebuilds its group in it)."""
        for name, unit in self.units.items():
            unit.group.load_state_dict(tree["groups"][name])
            unit.state = tree["strategies"][name]
        self.reference.load_state_dict(tree["reference"], context)
        self.stages.load_state_dict(tree["stages"])
        self.deletions.load_state_dict(tree["deletions"])
        self.ledger.load_state_dict(tree["ledger"])
        self.report.load_state_dict(tree["report"])
        self.progress.load_state_dict(tree["progress"])


class Run:
    """One open run: its configuration, its `RunState` (what checkpoints hold), what trains
    and scores it (trainer, evaluators, the logit cache), and its open folder (`RunDisk`)."""

    def __init__(self, cfg: Config, ds: data_lib.Dataset, disk: rundisk.RunDisk,
                 schedule: dict | None, log: Callable[[str], None], progress: bool,
                 initialise: bool = True):
        """``initialise``: draw the initial state (a new run), else only its shape (a run about
        to be restored)."""
        self.cfg, self.disk, self.say = cfg, disk, log
        out = self.out = disk.folder.root
        # With several processes (hosts), every process computes everything; the first writes
        # the run folder and keeps the deletion log.
        self.primary = jax.process_index() == 0
        self.t0 = time.perf_counter()
        self.chunks = plans.make_chunks(ds.n_train, cfg.phases, cfg.pretrain)
        self.train_labels, self.test_labels = ds.train_labels, ds.test_labels
        k_ens, k_base, self.k_unlearn = jax.random.split(jax.random.PRNGKey(cfg.seed), 3)
        ensemble = ModelGroup("ensemble", "ensemble", cfg.model, cfg.members + cfg.shadow_members,
                              cfg, k_ens, ds, devices=cfg.devices, initialise=initialise)
        ensemble.predicting = np.arange(ensemble.members) < cfg.members
        stages = Stages(cfg, self.chunks)
        deletions = deletions_lib.Deletions(cfg.seed, cfg.deletion_rate, self.chunks, schedule,
                                            ds.n_train)
        epochs = cfg.phases * (cfg.epochs * stages.slices("ensemble") + (
            config_lib.epochs_of(cfg, "baseline") if cfg.baseline != "none" else 0))
        report = Report(cfg, out, self._header(ds, ensemble), log, progress, self.primary, epochs)
        self.trainer = Trainer(cfg, deletions.mask,
                               EpochLog(report, cfg, ds.test_labels, self.test_logits))
        groups = {"ensemble": ensemble}
        if cfg.baseline != "none":
            groups["baseline"] = ModelGroup("baseline", "baseline", cfg.baseline, 1, cfg, k_base,
                                            ds, initialise=initialise)
        units = {name: Unit(groups[name], strategy, {})
                 for name, strategy in strategies.for_run(cfg).items()}
        self.state = RunState(units, strategies.Reference(units["ensemble"].strategy), stages,
                              deletions, Ledger(), report, Progress())
        for unit in units.values():
            unit.state = unit.strategy.init(self.context(unit))
        self.evaluators = evaluators.make(cfg)
        self.logits = evaluators.LogitCache(cfg.eval_batch_size)
        # Where this process's time went (scoring, checkpoint, ...), and when things happened.
        self.spans, self.marks = timing.Spans(), {}

    def _header(self, ds, ensemble: ModelGroup) -> records.Header:
        return {"data_source": ds.source, "n_train": ds.n_train, "n_test": ds.n_test,
                "member_parallel": ensemble.layout,
                "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
                "devices": ensemble.mesh.size if ensemble.mesh is not None else 1,
                "processes": jax.process_count(),
                "versions": {"python": platform.python_version(), "jax": jax.__version__,
                             "flax": _version("flax"), "optax": _version("optax")},
                "data_fingerprint": data_fingerprint(ds), **data_spec(ds)}

    @property
    def ensemble(self) -> ModelGroup:
        return self.state.units["ensemble"].group

    @property
    def baseline(self) -> ModelGroup | None:
        unit = self.state.units.get("baseline")
        return unit.group if unit else None

    @property
    def strategy(self) -> strategies.Strategy:
        return self.state.units["ensemble"].strategy

    def context(self, unit: Unit) -> strategies.Context:
        return strategies.Context(self.cfg, unit.group, self.trainer, self.state.stages,
                                  self.state.deletions.mask, self.k_unlearn, self.disk.snapshots)

    def elapsed(self) -> float:
        """Seconds of work on this run so far, over every process that resumed it."""
        return self.state.progress.elapsed + time.perf_counter() - self.t0

    def model(self, name: str, group: ModelGroup, live=None) -> evaluators.Model:
        method = self.cfg.aggregation if group.members > 1 else "mean_logits"
        return evaluators.Model(name, group, live, method)

    def eval_seconds(self) -> float:
        """Seconds spent scoring so far in this process (compilation left out)."""
        return self.logits.seconds

    def test_logits(self, group: ModelGroup, live=None) -> np.ndarray:
        """``group``'s member logits on the test set (cached until a member changes)."""
        with self.spans("scoring"):
            return self.logits.get(group, [group.data.test_ids], live)[0]

    def evaluate(self, models: list[evaluators.Model], forget: np.ndarray,
                 retain: np.ndarray) -> dict:
        """Every configured evaluator's blocks for ``models``."""
        evaluation = evaluators.Evaluation(self.logits, models, forget, retain,
                                           self.train_labels, self.test_labels)
        with self.spans("scoring"):
            return evaluators.evaluate(self.evaluators, evaluation)

    def save_logits(self) -> None:
        """Keeps the current members' cached logits on disk for the next process (the
        ``logits.npz``), the deleted ids' left out."""
        if self.primary and jax.process_count() == 1:
            self.logits.save(self.disk.folder.logits, [u.group for u in self.state.units.values()],
                             self.state.deletions.mask,
                             {"checkpoint": self.state.progress.checkpoint,
                              "deleted": len(self.state.deletions.ids)})

    def load_logits(self) -> int:
        """Takes the cached logits of the members a previous process saved (matched by their
        fingerprints); returns how many members matched."""
        if jax.process_count() > 1:  # every process must compute alike (collectives)
            return 0
        path = self.disk.folder.logits
        try:
            return self.logits.load(path, [u.group for u in self.state.units.values()])
        except evaluators.CacheError as e:  # only a cache: discarded, scored again
            self.say(f"{path.name} is damaged ({e}): discarded; the scores it kept are "
                     f"computed again")
            if self.primary:
                path.unlink(missing_ok=True)
            return 0

    def repair_derived(self) -> None:
        """Writes again the files derived from the state that cannot be read (``results.json``,
        a finished run's ``lineage.npz``), saying so: they are copies, the checkpoint is the
        state."""
        if not self.primary:
            return
        folder = self.disk.folder
        try:
            records.load(folder.results)
        except records.RecordError as e:
            self.say(f"{folder.results.name} could not be read ({e}): written again from "
                     f"checkpoint {self.state.progress.checkpoint}")
            self.state.report.save()
        if folder.lineage.exists():
            try:
                with np.load(folder.lineage, allow_pickle=False) as saved:
                    saved["lineage"], saved["deleted"]
            except Exception as e:  # zip, zlib and npy readers raise many kinds on damage
                self.say(f"{folder.lineage.name} could not be read ({type(e).__name__}: {e}): "
                         f"written again from checkpoint {self.state.progress.checkpoint}")
                self.ensemble.lineage.save(folder.lineage, self.state.deletions.ids)

    def drop_saved_logits(self) -> None:
        """Removes ``logits.npz``: a deletion is about to invalidate members whose scores
        it may hold (the next commit writes the survivors' again)."""
        if self.primary:
            self.disk.folder.logits.unlink(missing_ok=True)

    def retain_ids(self, phase: int) -> np.ndarray:
        return evaluators.retain_ids(self.cfg, self.chunks, phase, self.state.deletions.mask)

    def close(self) -> None:
        self.state.report.close()
        self.disk.close()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def data_fingerprint(ds: data_lib.Dataset) -> str:
    """A short hash of the labels and a few pixels: a resumed run checks it has its data."""
    h = hashlib.sha256()
    for x in (ds.train_labels, ds.test_labels, ds.train_images[:: max(1, ds.n_train // 64)]):
        h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()[:16]


def data_spec(ds: data_lib.Dataset) -> dict:
    """The header's ``data`` entry: the data's spec (classes, input shape and dtype,
    normalisation: `jaxunlearn.data.Dataset.spec`) unless it is CIFAR-10's, which a run
    records as nothing (as every run did before other data existed)."""
    return {} if ds.spec == data_lib.CIFAR10_SPEC else {"data": ds.spec}


def saved_config(run_dir) -> Config:
    """The configuration a run folder was made with, the plug-ins it records imported first
    (`jaxunlearn.plugins.load`: ConfigError naming a module that cannot be imported)."""
    path = RunFolder(run_dir).config
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run folder (no config.json); pass the folder "
                          f"that `jaxunlearn run` printed")
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise ConfigError(f"{path} is not a readable configuration: {e}") from None
    settings = plugins.read_config(raw, path)
    try:
        cfg = Config(**settings)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path} is not a readable configuration: {e}") from None
    found = config_lib.problems(cfg)
    if found:
        raise ConfigError(f"{path} is not a valid configuration: {'; '.join(found)}; put "
                          f"back the run's own config.json (nothing was changed)")
    return cfg


def config_changes(old: Config, new: Config) -> dict[str, tuple]:
    """The settings whose values differ: ``{name: (old value, new value)}``."""
    names = dict.fromkeys([*old.to_dict(), *new.to_dict()])
    return {k: (getattr(old, k), getattr(new, k)) for k in names
            if getattr(old, k) != getattr(new, k)}


def open_run(cfg: Config, workdir, dataset: data_lib.Dataset | None = None,
             log: Callable[[str], None] = print, progress: bool | None = None, *,
             allow_config_change: bool = False, purpose: str = "run",
             wait: float = 0.0) -> Run:
    """Opens the run ``cfg`` describes in ``workdir``: a new one when ``workdir`` holds no run
    (it is created, and checkpoint 0 written), else the existing run at its newest complete
    checkpoint. Nothing changes on disk until every check passed and the run is locked.

    Raises ConfigError (a setting that cannot work, or differs from an existing run's without
    ``allow_config_change`` or cannot change at all), DataError (the data is missing or not the
    run's), ScheduleError, `RunLocked` (another process has the run), or CheckpointError (no
    usable checkpoint)."""
    cfg = _located(cfg)
    out = pathlib.Path(workdir)
    folder = RunFolder(out)
    existing = folder.config.is_file()
    changes = (_check_changes(out, saved_config(out), cfg, allow_config_change) if existing
               else {})
    # A run stopped before its first checkpoint was complete (during its pretraining, say)
    # has nothing to restore and nothing deleted: it starts again in its own folder.
    unborn = existing and rundisk.unborn(out)
    if unborn:
        log(f"{out} stopped before its first checkpoint: starting it again")
        existing = False
    ds = run_dataset(cfg, out, dataset, existing)
    validation.check(cfg, ds.n_train, ds.input_shape, ds.classes)
    schedule = deletions_lib.load_schedule(cfg.deletions) if cfg.deletions else None
    if schedule is not None and not existing:
        deletions_lib.validate_schedule(
            schedule, plans.make_chunks(ds.n_train, cfg.phases, cfg.pretrain))
    if not existing and jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=unborn or (out.is_dir() and not any(out.iterdir())))
        folder.plots.mkdir(exist_ok=unborn)
        folder.config.write_text(plugins.config_json(cfg))
    run = _locked(cfg, ds, out, schedule, log, progress, purpose, wait, not existing)
    try:
        if existing:
            _restore(run, changes, log)
        else:
            if unborn and run.primary:
                run.disk.ckpts.discard_incomplete()
            if cfg.pretrain:
                pretraining.pretrain(run)
            durable.write_checkpoint(run)  # step 0: the initial state
            run.state.report.save()
    except BaseException:
        run.close()
        raise
    return run


def run_dataset(cfg: Config, run_dir, dataset: data_lib.Dataset | None = None,
                existing: bool = True, limit: bool = True) -> data_lib.Dataset:
    """The data of the run in ``run_dir``: ``dataset`` (else ``cfg.data``'s) limited as ``cfg``
    says (whole without ``limit``), and, for an ``existing`` run with a readable
    ``results.json``, checked to be the data it was trained on (fingerprint, classes, shape,
    normalisation). DataError saying what to pass otherwise; nothing is read but the data and
    ``results.json``."""
    saved = None
    if existing:
        try:  # (a damaged results.json is only a copy: the checkpoint is checked instead)
            saved = records.load(RunFolder(run_dir).results)
        except records.RecordError:
            pass
    if dataset is not None:
        ds = dataset
    else:
        try:
            ds = data_lib.load_dataset(cfg.data)
        except data_lib.DataError as e:
            if saved is None:
                raise
            raise data_lib.DataError(
                f"{e}\n{run_dir} was trained on {saved.get('data_source', 'unknown data')}: "
                f"{_PASS_DATA}") from e
    used = ds.limit(cfg.train_limit or None, cfg.test_limit or None)
    if saved is not None:
        _check_data(pathlib.Path(run_dir), saved, {"data_source": used.source,
                                                   "data_fingerprint": data_fingerprint(used),
                                                   **data_spec(used)})
    return used if limit else ds


_PASS_DATA = ("pass the run's dataset (dataset=... in Python, as when it was trained from data "
              "in memory), or its data setting (data=PATH --allow-config-change)")


def _located(cfg: Config) -> Config:
    """``cfg`` with a relative ``.npz`` data path made absolute: the run records it, and finds
    its data again from any folder (resume, forget)."""
    path = pathlib.Path(cfg.data).expanduser()
    if cfg.data.endswith(".npz") and not path.is_absolute():
        return dataclasses.replace(cfg, data=str(path.resolve()))
    return cfg


def _check_data(out: pathlib.Path, saved: records.Results, found: records.Header) -> None:
    """DataError when the data ``found`` (its header: source, fingerprint, spec) is not the
    data whose results were ``saved``, or has other classes, shape or normalisation."""
    expected = saved.get("data_fingerprint")
    if expected and expected != found["data_fingerprint"]:
        raise data_lib.DataError(
            f"the data found ({found['data_source']}) is not the data {out} was trained on "
            f"({saved.get('data_source', 'unknown')}); {_PASS_DATA}")
    want = saved.get("data", data_lib.CIFAR10_SPEC)
    got = found.get("data", data_lib.CIFAR10_SPEC)
    differ = [k for k in want if want[k] != got.get(k)]
    if differ:
        raise data_lib.DataError(
            f"the data found ({found['data_source']}) has other {', '.join(differ)} than {out} "
            f"was trained with (" + "; ".join(f"{k}: {got.get(k)} instead of {want[k]}"
                                             for k in differ)
            + "); pass the same data with the run's classes, mean and std (from_arrays(..., "
              "classes=..., mean=..., std=...))")


def _check_changes(out: pathlib.Path, old: Config, cfg: Config, allow: bool) -> dict:
    changes = config_changes(old, cfg)
    if changes:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
        fixed = sorted(set(changes) - RESUMABLE_CHANGES - UNLEARNING_CHANGES)
        if fixed:
            raise ConfigError(f"cannot resume {out} with a different {', '.join(fixed)} "
                              f"({listed}): the checkpoints depend on it; start a new run")
        if not allow:
            raise ConfigError(f"{out} was made with a different configuration ({listed}); "
                              f"pass --allow-config-change to resume with it, or drop the "
                              f"overrides")
    return changes


def _locked(cfg, ds, out, schedule, log, progress, purpose, wait, initialise) -> Run:
    """Locks the run folder (the primary process), opens it, then builds its `Run`."""
    lock = contextlib.ExitStack()
    try:
        primary = jax.process_index() == 0
        held = (lock.enter_context(runlock.run_lock(out, wait=wait, purpose=purpose))
                if primary else None)
        disk = rundisk.RunDisk(out, primary, lock, held)
        return Run(cfg, ds, disk, schedule, log,
                   sys.stderr.isatty() if progress is None else progress, initialise)
    except BaseException:
        lock.close()  # and whatever the disk opened
        raise


def _restore(run: Run, changes: dict, log: Callable[[str], None]) -> None:
    """Puts an existing run back in the state of its newest complete checkpoint and finishes
    the durable step a crash interrupted."""
    step, tree, _ = run.disk.ckpts.load_latest(log)
    # Before anything changes: the data is the run's, the log holds what was applied.
    _check_data(run.out, Report.results_in(tree), run.state.report.results)
    run.disk.check_log(tree, step)
    if run.primary:
        gone = run.disk.ckpts.discard_incomplete()
        if gone:
            log(f"discarded incomplete checkpoint(s) {gone} (a write that never finished)")
    position = tree["progress"]["position"]
    unlearning = sorted(UNLEARNING_CHANGES & set(changes))
    if unlearning and (tree["deletions"]["ids"] or (run.disk.log is not None
                                                    and run.disk.log.records())):
        raise ConfigError(f"{run.out} has deleted ids or logged deletion requests, so "
                          f"{', '.join(unlearning)} can no longer change (its state depends on "
                          f"how they were unlearned); start a new run, or fork the run before "
                          f"its first deletion")
    moved = sorted({"epochs", "batch_size"} & set(changes))
    if position is not None and moved:
        raise ConfigError(f"checkpoint {step} is inside phase {position['phase']}: "
                          f"{', '.join(moved)} cannot change until the phase is over")
    if run.primary:
        for bad in run.disk.ckpts.damaged:  # useless, and perhaps holding deleted ids
            run.disk.ckpts.delete(bad)
            log(f"removed damaged checkpoint {bad}")
    try:
        run.state.load_state_dict(tree, run.context(run.state.units["ensemble"]))
    except ValueError as e:  # flax: the saved state's structure is not the configured one
        if not changes:
            raise
        raise ConfigError(f"checkpoint {step} of {run.out} does not fit the changed "
                          f"{', '.join(changes)} ({e}); the change alters the shape of the "
                          f"saved state (sgd's weight decay from 0 adds an optimiser step, "
                          f"say): resume without it. Nothing was changed") from None
    if run.primary and changes:  # the accepted configuration is the run's from now on
        atomic_write(run.disk.folder.config, plugins.config_json(run.cfg))
    run.t0 = time.perf_counter()
    run.load_logits()
    if unlearning:  # nothing deleted yet: the strategies start afresh
        for unit in run.state.units.values():
            unit.state = unit.strategy.init(run.context(unit))
    run.state.progress.checkpoint = step
    run.repair_derived()
    run.state.report.results["config"] = plugins.describe(run.cfg)
    if changes:  # a finished run is evaluated again under its new settings
        run.state.report.results["complete"] = False
    recovery.reapply_logged_deletions(run, step, log)
    # Finish a durable step a crash interrupted: the purge and the log's outcomes.
    durable.complete_requests(run, durable.purge(run))
    position = run.state.progress.position
    where = (f"inside phase {position['phase']}" if position else
             f"after phase {run.state.progress.phase_done}")
    log(f"resuming {run.out} from checkpoint {step} ({where})")


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except (ImportError, AttributeError):
        return "unknown"
