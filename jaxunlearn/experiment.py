"""The phase loop: train the ensemble and the baseline chunk by chunk, delete, unlearn, report.

`run(config, out_dir)` is the whole experiment. It writes into ``out_dir`` (which must be new):
``config.json``, ``metrics.jsonl`` (one line per epoch and per phase), ``results.json`` (rewritten
atomically after every phase, ``"complete": true`` at the end), ``lineage.npz`` and
``plots/accuracy_loss.png``.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import sys
import time
from typing import Callable

import jax
import numpy as np

from jaxunlearn import data as data_lib
from jaxunlearn import deletions as deletions_lib
from jaxunlearn import ensemble, metrics, plans, sharding, unlearn
from jaxunlearn.config import Config, ConfigError
from jaxunlearn.group import ModelGroup
from jaxunlearn.models import ARCHITECTURES, PRECISIONS, STEMS
from jaxunlearn.train import make_optimizer

# Independent host random streams, so that changing one part of a run (say, evaluation) never
# shifts the samples another part draws.
_STREAM_ENSEMBLE, _STREAM_BASELINE, _STREAM_DELETIONS, _STREAM_RETRAIN = range(4)


def check_config(cfg: Config, n_train: int) -> None:
    """Rejects settings that cannot work, before anything is trained or written."""
    def need(ok, message):
        if not ok:
            raise ConfigError(message)

    need(cfg.members >= 1, f"members must be at least 1, got {cfg.members}")
    need(cfg.phases >= 1, f"phases must be at least 1, got {cfg.phases}")
    need(cfg.epochs >= 1, f"epochs must be at least 1, got {cfg.epochs}")
    need(cfg.batch_size >= 1 and cfg.eval_batch_size >= 1, "batch sizes must be at least 1")
    need(cfg.model in ARCHITECTURES, f"unknown model {cfg.model!r}; choose one of {sorted(ARCHITECTURES)}")
    need(cfg.baseline == "none" or cfg.baseline in ARCHITECTURES,
         f"unknown baseline {cfg.baseline!r}; choose none or one of {sorted(ARCHITECTURES)}")
    need(cfg.stem in STEMS, f"unknown stem {cfg.stem!r}; choose one of {STEMS}")
    need(cfg.precision in PRECISIONS,
         f"unknown precision {cfg.precision!r}; choose one of {sorted(PRECISIONS)}")
    need(cfg.plan in plans.PLANS, f"unknown plan {cfg.plan!r}; choose one of {plans.PLANS}")
    need(cfg.aggregation in metrics.AGGREGATIONS,
         f"unknown aggregation {cfg.aggregation!r}; choose one of {metrics.AGGREGATIONS}")
    need(0 < cfg.fraction <= 1 and 0 < cfg.baseline_fraction <= 1, "fractions must be in (0, 1]")
    need(0 <= cfg.deletion_rate < 1, f"deletion_rate must be in [0, 1), got {cfg.deletion_rate}")
    need(n_train >= cfg.phases, f"{n_train} training examples cannot fill {cfg.phases} phases")
    try:
        unlearn.check_strategy(cfg.strategy)
        strategy = ensemble.resolve_strategy(cfg.member_parallel, arch=cfg.model)
        per_device = cfg.members
        if cfg.devices != 1:
            mesh = sharding.member_mesh(cfg.devices)
            sharding.check_divisible(cfg.members, mesh)
            per_device = cfg.members // mesh.size
        make_optimizer(cfg.optimizer, cfg.learning_rate, cfg.weight_decay)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    k = ensemble.hybrid_group_size(strategy)
    if k:
        need(per_device % k == 0, f"member_parallel={strategy} needs the members of each device "
                                  f"({per_device}) divisible by {k}; choose K dividing {per_device}")
    chunks = plans.make_chunks(n_train, cfg.phases)
    nothing_deleted = np.zeros(n_train, bool)
    for plan, fraction, who in ((cfg.plan, cfg.fraction, "each member"),
                                ("bootstrap", cfg.baseline_fraction, "the baseline")):
        if who == "the baseline" and cfg.baseline == "none":
            continue
        for phase in range(1, cfg.phases + 1):
            size = plans.sample_size(plan, fraction, chunks, phase, nothing_deleted)
            need(size >= 1, f"plan {plan!r} with fraction {fraction} gives {who} no data in phase "
                            f"{phase} ({n_train} examples in {cfg.phases} phases); raise the fraction")


def _member_records(logits, labels, valid, born) -> list[dict]:
    return [dict(member=i, **metrics.score(logits[i], labels), valid=bool(valid[i]),
                 born=int(born[i])) for i in range(logits.shape[0])]


class Experiment:
    """The driver of one run: owns the run folder, the model groups, the deletion state and the
    results; `run_phase` advances one phase, `finish` writes the end state."""

    def __init__(self, cfg: Config, ds: data_lib.Dataset, out: pathlib.Path,
                 schedule: dict[int, list[int]] | None, log: Callable[[str], None],
                 progress: bool):
        from tqdm.auto import tqdm

        self.cfg, self.out, self.schedule, self.log = cfg, out, schedule, log
        self.n_train, self.n_test = ds.n_train, ds.n_test
        self.chunks = plans.make_chunks(ds.n_train, cfg.phases)
        k_ens, k_base, self.k_unlearn = jax.random.split(jax.random.PRNGKey(cfg.seed), 3)
        rngs = [np.random.default_rng([cfg.seed, s]) for s in range(4)]
        self.deletion_rng, self.retrain_rng = rngs[_STREAM_DELETIONS], rngs[_STREAM_RETRAIN]
        self.test_labels = ds.test_labels
        arrays = (ds.train_images, ds.train_labels, ds.test_images)
        self.ens = ModelGroup("ensemble", cfg.model, cfg.members, cfg, k_ens, arrays,
                              rngs[_STREAM_ENSEMBLE], devices=cfg.devices)
        self.base = (ModelGroup("baseline", cfg.baseline, 1, cfg, k_base, arrays,
                                rngs[_STREAM_BASELINE]) if cfg.baseline != "none" else None)
        self.deleted = np.zeros(ds.n_train, bool)
        self.all_deleted: list[int] = []
        self.replacements = 0
        self.results = {
            "complete": False, "config": cfg.to_dict(), "data_source": ds.source,
            "n_train": ds.n_train, "n_test": ds.n_test, "member_parallel": self.ens.strategy,
            "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
            "devices": self.ens.mesh.size if self.ens.mesh is not None else 1,
            "processes": jax.process_count(),
            "versions": {"python": platform.python_version(), "jax": jax.__version__,
                         "flax": _version("flax"), "optax": _version("optax")},
            "phases": [],
        }
        groups = 2 if self.base else 1
        self.bar = tqdm(total=cfg.phases * cfg.epochs * groups, disable=not progress,
                        unit="epoch", leave=False, dynamic_ncols=True)
        # With several processes (hosts), every process computes everything; the first writes.
        self.primary = jax.process_index() == 0
        self.metrics_file = open(out / "metrics.jsonl" if self.primary else os.devnull, "a",
                                 buffering=1)

    def close(self) -> None:
        self.bar.close()
        self.metrics_file.close()

    def save_results(self) -> None:
        """Rewrites ``results.json`` atomically (a reader never sees a half-written file)."""
        if self.primary:
            tmp = self.out / "results.json.tmp"
            tmp.write_text(json.dumps(self.results, indent=2))
            os.replace(tmp, self.out / "results.json")

    def emit(self, record: dict) -> None:
        self.metrics_file.write(json.dumps(record) + "\n")

    def logits(self, group: ModelGroup) -> np.ndarray:
        return group.member_logits(self.cfg.eval_batch_size)

    def train_group(self, group: ModelGroup, phase: int, samples: np.ndarray,
                    active: np.ndarray, kind: str = "epoch") -> float:
        """Trains ``active`` members of ``group`` for the configured epochs; returns seconds."""
        cfg, t0 = self.cfg, time.perf_counter()

        def on_epoch(epoch: int, train_loss: np.ndarray) -> None:
            self.bar.set_description(f"phase {phase}/{cfg.phases} {group.name}")
            self.bar.update(1)
            line = {"kind": kind, "phase": phase, "model": group.name, "epoch": epoch,
                    "train_loss": [float(x) if a else None for x, a in zip(train_loss, active)],
                    "seconds": time.perf_counter() - t0}
            if cfg.eval_every_epoch:
                logits = self.logits(group)
                line["members"] = [metrics.score(l, self.test_labels) for l in logits]
                if group is self.ens:
                    line["ensemble"] = metrics.aggregate(logits, self.test_labels, None,
                                                         cfg.aggregation)
            self.emit(line)

        group.train(samples, cfg.epochs, cfg.batch_size, active, on_epoch)
        return time.perf_counter() - t0

    def deletions_after(self, phase: int) -> np.ndarray:
        """The ids deleted after ``phase``: from the explicit schedule, or drawn at random."""
        if self.schedule is not None:
            return np.asarray(sorted(self.schedule.get(phase, [])), np.int64)
        if phase == self.cfg.phases:
            return np.zeros(0, np.int64)
        return deletions_lib.random_deletions(
            self.deletion_rng, plans.working_set(self.chunks, phase, self.deleted),
            self.cfg.deletion_rate, arrived=sum(len(c) for c in self.chunks[:phase]))

    def run_phase(self, phase: int) -> dict:
        """Trains every group on its sample of ``phase``, evaluates, deletes and unlearns."""
        cfg, ens, base, labels = self.cfg, self.ens, self.base, self.test_labels
        t_phase = time.perf_counter()
        record: dict = {"phase": phase, "working_set": int(len(
            plans.working_set(self.chunks, phase, self.deleted)))}
        seconds = {}
        for group, plan, fraction in ((ens, cfg.plan, cfg.fraction),
                                      (base, "bootstrap", cfg.baseline_fraction)):
            if group is None:
                continue
            samples = plans.draw_samples(group.rng, plan, fraction, group.members, self.chunks,
                                         phase, self.deleted)
            if cfg.reset_optimizer_each_phase:
                group.reset_optimizer()
            seconds[group.name] = self.train_group(group, phase, samples,
                                                   np.ones(group.members, bool))
            if group is ens:
                record["sample_size"] = int(samples.shape[1])

        member_logits = self.logits(ens)
        record["ensemble"] = metrics.aggregate(member_logits, labels, None, cfg.aggregation)
        record["aggregations"] = {a: metrics.aggregate(member_logits, labels, None, a)
                                  for a in metrics.AGGREGATIONS}
        record["baseline"] = metrics.score(self.logits(base)[0], labels) if base else None

        ids = self.deletions_after(phase)
        invalid = ens.lineage.invalid(ids)
        record["deleted_ids"] = ids.tolist()
        record["invalidated"] = np.flatnonzero(invalid).tolist()
        record["members"] = _member_records(member_logits, labels, ~invalid, ens.lineage.born)
        if ids.size:
            record["after_unlearning"] = self.unlearn(phase, ids, invalid, member_logits, seconds)
        record["seconds"] = time.perf_counter() - t_phase
        record["seconds_by_model"] = seconds
        self.results["phases"].append(record)
        self.emit({"kind": "phase", **record})
        self.log(_phase_line(record, cfg.phases))
        self.save_results()
        return record

    def unlearn(self, phase: int, ids: np.ndarray, invalid: np.ndarray,
                member_logits: np.ndarray, seconds: dict) -> dict:
        """Marks ``ids`` deleted and reinitialises the ``invalid`` members (strategy
        ``replace``: they join the next phase; after the last phase they retrain at once)."""
        cfg, ens, labels = self.cfg, self.ens, self.test_labels
        self.deleted[ids] = True
        self.all_deleted.extend(ids.tolist())
        ens.unlearn(jax.random.fold_in(self.k_unlearn, phase), invalid)
        ens.lineage.reset(invalid, phase)
        self.replacements += int(invalid.sum())
        after = {"ensemble": metrics.aggregate(member_logits, labels, ~invalid, cfg.aggregation)}
        if phase == cfg.phases and invalid.any():
            samples = plans.draw_samples(self.retrain_rng, cfg.plan, cfg.fraction, cfg.members,
                                         self.chunks, phase, self.deleted)
            self.bar.total += cfg.epochs
            seconds["retrain"] = self.train_group(ens, phase, samples, invalid, kind="retrain")
            logits = self.logits(ens)
            after["ensemble"] = metrics.aggregate(logits, labels, None, cfg.aggregation)
            after["members"] = _member_records(logits, labels, np.ones(cfg.members, bool),
                                               ens.lineage.born)
        return after

    def finish(self, wall_seconds: float) -> dict:
        """Writes the end state: ``final``, the lineage audit, ``lineage.npz`` and the plot."""
        from jaxunlearn import plots

        last = self.results["phases"][-1]
        final = {k: last[k] for k in ("phase", "deleted_ids", "invalidated", "ensemble",
                                      "baseline", "members", "seconds")}
        if "members" in last.get("after_unlearning", {}):
            final["ensemble"] = last["after_unlearning"]["ensemble"]
            final["members"] = last["after_unlearning"]["members"]
        violations = self.ens.lineage.violations(self.all_deleted)
        self.results.update({
            "complete": True,
            "final": final,
            "deleted_ids": sorted(self.all_deleted),
            "replacements": self.replacements,
            "lineage_audit": {"ok": violations == 0, "violations": violations,
                              "members": self.cfg.members, "deleted": len(self.all_deleted)},
            # The baseline is a reference model, as in the original study: it never trains on
            # a deleted id after its deletion but is not unlearned; this counts what it holds.
            "baseline_deleted_ids_in_lineage": (self.base.lineage.violations(self.all_deleted)
                                                if self.base else None),
            "wall_seconds": wall_seconds,
        })
        if self.primary:
            self.ens.lineage.save(self.out / "lineage.npz", self.all_deleted)
            self.save_results()
            plots.plot_phases(self.results, self.out / "plots" / "accuracy_loss.png")
        return self.results


def prepare(cfg: Config, out_dir, dataset: data_lib.Dataset | None = None,
            log: Callable[[str], None] = print, progress: bool | None = None) -> Experiment:
    """Checks everything that can be checked (config, data, deletion schedule), then creates
    the run folder ``out_dir`` (which must be new) and the `Experiment` that will fill it."""
    ds = dataset if dataset is not None else data_lib.load_dataset(cfg.data)
    ds = ds.limit(cfg.train_limit or None, cfg.test_limit or None)
    check_config(cfg, ds.n_train)
    schedule = None
    if cfg.deletions:
        schedule = deletions_lib.load_schedule(cfg.deletions)
        deletions_lib.validate_schedule(schedule, plans.make_chunks(ds.n_train, cfg.phases))
    out = pathlib.Path(out_dir)
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=False)
        (out / "plots").mkdir()
        (out / "config.json").write_text(cfg.to_json())
    return Experiment(cfg, ds, out, schedule, log,
                      sys.stderr.isatty() if progress is None else progress)


def run(cfg: Config, out_dir, dataset: data_lib.Dataset | None = None,
        log: Callable[[str], None] = print, progress: bool | None = None) -> dict:
    """Runs the experiment described by ``cfg`` and writes the run folder ``out_dir`` (new).

    Args:
      dataset: pre-loaded data (else loaded from ``cfg.data``).
      log: receives one summary line per phase.
      progress: show a progress bar (default: only when stderr is a terminal).
    Returns:
      The results dictionary also written to ``results.json``.
    """
    t_start = time.perf_counter()
    exp = prepare(cfg, out_dir, dataset, log, progress)
    try:
        for phase in range(1, cfg.phases + 1):
            exp.run_phase(phase)
    finally:
        exp.close()
    return exp.finish(time.perf_counter() - t_start)


def _phase_line(r: dict, phases: int) -> str:
    e, b = r["ensemble"], r["baseline"]
    text = (f"phase {r['phase']}/{phases}: ensemble acc {e['test_accuracy']:.4f} "
            f"loss {e['test_loss']:.4f}")
    if b:
        text += f" | baseline acc {b['test_accuracy']:.4f} loss {b['test_loss']:.4f}"
    if r["deleted_ids"]:
        text += f" | deleted {len(r['deleted_ids'])}, invalidated members {r['invalidated']}"
    return text + f" | {r['seconds']:.1f}s"


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except (ImportError, AttributeError):
        return "unknown"
