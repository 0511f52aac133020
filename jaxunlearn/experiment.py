"""The phase loop: train the ensemble and the baseline chunk by chunk, delete, unlearn, report.

`run(config, out_dir)` is the whole experiment. It writes into ``out_dir`` (which must be new):
``config.json``, ``metrics.jsonl`` (one line per epoch and per phase), ``results.json`` (rewritten
atomically after every phase, ``"complete": true`` at the end), ``lineage.npz`` and
``plots/accuracy_loss.png``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import platform
import re
import sys
import time
from typing import Callable, NamedTuple

import jax
import numpy as np

from jaxunlearn import data as data_lib
from jaxunlearn import deletions as deletions_lib
from jaxunlearn import checkpoint, deletion_log, ensemble, faults, metrics, mia, plans, sharding
from jaxunlearn import unlearn
from jaxunlearn.config import Config, ConfigError, apply_overrides
from jaxunlearn.group import ModelGroup, TrainingDiverged
from jaxunlearn.lineage import Lineage
from jaxunlearn.models import ARCHITECTURES, PRECISIONS, STEMS
from jaxunlearn.train import make_optimizer

# Independent host random streams, so that changing one part of a run (say, evaluation) never
# shifts the samples another part draws.
(_STREAM_ENSEMBLE, _STREAM_BASELINE, _STREAM_DELETIONS, _STREAM_RETRAIN, _STREAM_SHARDS,
 _STREAM_EVAL) = range(6)
_STREAMS = 6
_SOURCES = {"ensemble": 0, "baseline": 1}  # whose batch order a group's stage replays


ORACLE_REFERENCES = ("none", "end", "deletions")
BASELINE_PLANS = ("bootstrap", "full")
BASELINE_UNLEARNING = ("auto", "none", "oracle")


def check_config(cfg: Config, n_train: int) -> None:
    """Rejects settings that cannot work, before anything is trained or written."""
    def need(ok, message):
        if not ok:
            raise ConfigError(message)

    def choice(name, value, options):
        need(value in options, f"unknown {name} {value!r}; choose one of {', '.join(options)}")

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
    choice("plan", cfg.plan, plans.PLANS)
    choice("aggregation", cfg.aggregation, metrics.AGGREGATIONS)
    choice("oracle_reference", cfg.oracle_reference, ORACLE_REFERENCES)
    choice("baseline_plan", cfg.baseline_plan, BASELINE_PLANS)
    choice("baseline_unlearning", cfg.baseline_unlearning, BASELINE_UNLEARNING)
    need(0 < cfg.fraction <= 1 and 0 < cfg.baseline_fraction <= 1, "fractions must be in (0, 1]")
    need(0 <= cfg.deletion_rate < 1, f"deletion_rate must be in [0, 1), got {cfg.deletion_rate}")
    need(cfg.slices >= 1, f"slices must be at least 1, got {cfg.slices}")
    need(cfg.slices == 1 or cfg.plan == "shards",
         f"slices={cfg.slices} needs plan=shards (the other plans have one stage per phase)")
    need(cfg.plan != "shards" or cfg.fraction == 1,
         f"plan=shards trains each member on its whole shard (1/members of each chunk); "
         f"set fraction=1 (got {cfg.fraction})")
    need(np.isfinite(cfg.learning_rate) and cfg.learning_rate > 0,
         f"learning_rate must be a positive number, got {cfg.learning_rate}")
    need(cfg.checkpoint_every >= 0, f"checkpoint_every must be 0 (phase ends only) or a number "
                                    f"of steps, got {cfg.checkpoint_every}")
    need(cfg.keep_checkpoints >= 1, f"keep_checkpoints must be at least 1, got "
                                    f"{cfg.keep_checkpoints}")
    need(cfg.retain_eval >= 1, f"retain_eval must be at least 1, got {cfg.retain_eval}")
    need(cfg.mia_folds >= 2, f"mia_folds must be at least 2, got {cfg.mia_folds}")
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
                                (cfg.baseline_plan, cfg.baseline_fraction, "the baseline")):
        if (who == "the baseline" and cfg.baseline == "none") or plan == "full":
            continue
        for phase in range(1, cfg.phases + 1):
            size = plans.sample_size(plan, fraction, chunks, phase, nothing_deleted,
                                     cfg.members, cfg.slices)
            if plan == "shards":
                need(size >= 1, f"plan shards with {cfg.members} members and {cfg.slices} "
                                f"slice(s) leaves a member no data in phase {phase} "
                                f"({len(chunks[phase - 1])} examples in its chunk); use fewer "
                                f"members or slices, or more data")
            need(size >= 1, f"plan {plan!r} with fraction {fraction} gives {who} no data in phase "
                            f"{phase} ({n_train} examples in {cfg.phases} phases); raise the fraction")


def _member_records(logits, labels, valid, born) -> list[dict]:
    return [dict(member=i, **metrics.score(logits[i], labels), valid=bool(valid[i]),
                 born=int(born[i])) for i in range(logits.shape[0])]


class Stage(NamedTuple):
    """One training stage of a group: a phase, or a slice of one (``shards`` with slices)."""

    phase: int
    slice: int
    samples: list  # each member's ids as drawn (replays remove the ids deleted since)
    pool: np.ndarray | None  # what a bootstrap/subset member drew from (None: deterministic)


class Experiment:
    """The driver of one run: owns the run folder, the model groups, the deletion state and the
    results; `run_phase` advances one phase, `finish` writes the end state.

    Every group trains in *stages* (one per phase, or ``slices`` per phase for ``shards``); the
    driver records each stage's samples, and member ``i``'s batch order in stage ``t`` comes
    from a generator seeded with ``(seed, group, t, round, epoch, i)``. So a member retrained
    on a stage (``rewind``, ``oracle``) sees exactly the batches it saw, minus deleted ids, and
    an oracle with nothing deleted reproduces the run bit for bit.
    """

    def __init__(self, cfg: Config, ds: data_lib.Dataset, out: pathlib.Path,
                 schedule: dict[int, list[int]] | None, log: Callable[[str], None],
                 progress: bool, lock: contextlib.ExitStack | None = None):
        """``lock``: the held run-folder lock (`jaxunlearn.runlock`), released by `close`."""
        from tqdm.auto import tqdm

        self.cfg, self.out, self.schedule, self.log = cfg, out, schedule, log
        self.lock = lock
        self.t0, self.elapsed_before = time.perf_counter(), 0.0
        self.n_train, self.n_test = ds.n_train, ds.n_test
        self.chunks = plans.make_chunks(ds.n_train, cfg.phases)
        k_ens, k_base, self.k_unlearn = jax.random.split(jax.random.PRNGKey(cfg.seed), 3)
        rngs = [np.random.default_rng([cfg.seed, s]) for s in range(_STREAMS)]
        self.deletion_rng, self.retrain_rng = rngs[_STREAM_DELETIONS], rngs[_STREAM_RETRAIN]
        self.test_labels, self.train_labels = ds.test_labels, ds.train_labels
        arrays = (ds.train_images, ds.train_labels, ds.test_images, ds.test_labels)
        self.ens = ModelGroup("ensemble", cfg.model, cfg.members, cfg, k_ens, arrays,
                              rngs[_STREAM_ENSEMBLE], devices=cfg.devices)
        self.base = (ModelGroup("baseline", cfg.baseline, 1, cfg, k_base, arrays,
                                rngs[_STREAM_BASELINE]) if cfg.baseline != "none" else None)
        self.slices = {"ensemble": cfg.slices if cfg.plan == "shards" else 1, "baseline": 1}
        self.shards = (plans.make_shards(rngs[_STREAM_SHARDS], self.chunks, cfg.members,
                                         cfg.slices) if cfg.plan == "shards" else None)
        self.stages: dict[str, dict[int, Stage]] = {"ensemble": {}, "baseline": {}}
        # rewind: every member's state and lineage at each stage boundary (0: initial).
        self.snapshots: dict[int, tuple] | None = None
        # A snapshot needs the optimiser state only when a replay can start mid-phase or keeps
        # it across phases; otherwise the replay resets it first (a third of Adam's memory).
        self.snapshot_optimizer = not (cfg.reset_optimizer_each_phase
                                       and self.slices["ensemble"] == 1)
        if cfg.strategy == "rewind":
            self.snapshots = {}
            self.snapshot(0, np.ones(cfg.members, bool))
        self.baseline_oracle = baseline_unlearned(cfg)
        self.deleted = np.zeros(ds.n_train, bool)
        self.all_deleted: list[int] = []
        self.replacements = 0
        self.rounds = 0
        self.oracle: ModelGroup | None = None  # the latest oracle reference, and its stage
        self.oracle_stage, self.oracle_deleted, self.oracle_cost_measured = -1, -1, {}
        self.training = {"member_epochs": 0, "member_examples": 0, "seconds": 0.0}
        self.events: list[dict] = []
        self.results = {
            "complete": False, "config": cfg.to_dict(), "data_source": ds.source,
            "n_train": ds.n_train, "n_test": ds.n_test, "member_parallel": self.ens.strategy,
            "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
            "devices": self.ens.mesh.size if self.ens.mesh is not None else 1,
            "processes": jax.process_count(),
            "versions": {"python": platform.python_version(), "jax": jax.__version__,
                         "flax": _version("flax"), "optax": _version("optax")},
            "data_fingerprint": data_fingerprint(ds),
            "phases": [],
        }
        groups = 2 if self.base else 1
        self.bar = tqdm(total=cfg.phases * cfg.epochs * (groups - 1 + self.slices["ensemble"]),
                        disable=not progress, unit="epoch", leave=False, dynamic_ncols=True)
        # With several processes (hosts), every process computes everything; the first writes.
        self.primary = jax.process_index() == 0
        self.metrics_file = open(out / "metrics.jsonl" if self.primary else os.devnull, "a",
                                 buffering=1)
        # Durability: where the run stands, its checkpoints and its deletion log.
        self.phase_done = 0  # phases finished, deletions and checkpoint included
        self.position: dict | None = None  # inside a phase: where its last checkpoint was
        self.steps_done = 0  # optimiser steps of phase training (for checkpoint_every)
        self.ckpt_step = -1
        self.applied_requests: list[int] = []
        # Every process reads checkpoints (a run folder several hosts share); the first
        # writes them and keeps the deletion log.
        self.ckpts = checkpoint.Checkpoints(out, read_only=not self.primary)
        self.requests = deletion_log.DeletionLog.open(out) if self.primary else None

    def close(self) -> None:
        self.bar.close()
        self.metrics_file.close()
        self.ckpts.close()
        if self.requests is not None:
            self.requests.close()
        if self.lock is not None:
            self.lock.close()

    def elapsed(self) -> float:
        """Seconds of work on this run so far, over every process that resumed it."""
        return self.elapsed_before + time.perf_counter() - self.t0

    def run_all(self) -> dict:
        """Runs the remaining phases (from a resumed position too), applies queued requests
        and writes the end state."""
        cfg = self.cfg
        try:
            while self.phase_done < cfg.phases:
                self.run_phase(self.phase_done + 1)
            self.finish(self.elapsed())
            while self.apply_pending():  # requests queued while the run finished
                self.finish(self.elapsed())
        except TrainingDiverged as e:
            steps = self.ckpts.steps()
            message = (f"{e} in phase {self.phase_done + 1}; the run stopped. The last good "
                       f"checkpoint is {steps[-1] if steps else 'none'}; resume from it with a "
                       f"lower learning rate: jaxunlearn run --resume {self.out} "
                       f"learning_rate={cfg.learning_rate / 10:g} --allow-config-change")
            self.results["error"] = {"kind": "diverged", "group": e.group,
                                     "members": e.members, "phase": self.phase_done + 1,
                                     "epoch": e.epoch, "step": e.step, "message": message}
            self.save_results()
            raise TrainingDiverged(e.group, e.members, e.epoch, e.step, message) from None
        return self.results

    def apply_pending(self) -> list[dict]:
        """Applies every `forget` request pending in the log to this finished run: unlearning,
        checkpoint, purge and outcome. Returns the request records."""
        done = []
        for request in self.queued_requests():
            done.append(self.apply_request(request, self.cfg.phases))
            self.make_durable([request["id"]])
        return done

    def queued_requests(self):
        """The `forget` requests pending in the log that this run has not applied (single
        process only: other processes cannot read the log)."""
        if self.requests is None or jax.process_count() > 1:
            return
        for request in self.requests.pending():
            if request["source"].startswith("forget") and request["id"] not in self.applied_requests:
                yield request

    def save_results(self) -> None:
        """Rewrites ``results.json`` atomically (a reader never sees a half-written file)."""
        if self.primary:
            tmp = self.out / "results.json.tmp"
            tmp.write_text(json.dumps(self.results, indent=2))
            os.replace(tmp, self.out / "results.json")

    def emit(self, record: dict) -> None:
        self.metrics_file.write(json.dumps(record) + "\n")

    def logits(self, group: ModelGroup, ids=None) -> np.ndarray:
        return group.member_logits(self.cfg.eval_batch_size, ids)

    # ---- training ------------------------------------------------------------------------

    def train_stage(self, group: ModelGroup, source: str, t: int, samples, active: np.ndarray,
                    kind: str = "epoch", round_: int = 0, start=(1, 0, None),
                    on_step=None) -> tuple[float, int]:
        """Trains ``active`` members of ``group`` on stage ``t`` of ``source`` (whose batch
        order they replay) for the configured epochs; returns (seconds, examples fed)."""
        cfg, t0 = self.cfg, time.perf_counter()
        phase = (t - 1) // self.slices[source] + 1
        seed_key = (cfg.seed, _SOURCES[source], t, round_)

        def on_epoch(epoch: int, train_loss: np.ndarray) -> None:
            self.bar.set_description(f"phase {phase}/{cfg.phases} {group.name}")
            self.bar.update(1)
            line = {"kind": kind, "phase": phase, "model": group.name, "epoch": epoch,
                    "train_loss": [float(x) if a else None for x, a in zip(train_loss, active)],
                    "seconds": time.perf_counter() - t0}
            if self.slices[source] > 1:
                line["slice"] = (t - 1) % self.slices[source] + 1
            if cfg.eval_every_epoch:
                logits = self.logits(group)
                line["members"] = [metrics.score(l, self.test_labels) for l in logits]
                if group.members > 1:
                    line["ensemble"] = metrics.aggregate(logits, self.test_labels, None,
                                                         cfg.aggregation)
            self.emit(line)

        examples = group.train(samples, cfg.epochs, cfg.batch_size, active, on_epoch, seed_key,
                               start, on_step)
        return time.perf_counter() - t0, examples

    def draw(self, source: str, group: ModelGroup, phase: int, slice_: int) -> Stage:
        """The samples of a new stage under the group's plan."""
        cfg = self.cfg
        plan, fraction = ((cfg.plan, cfg.fraction) if source == "ensemble"
                          else (cfg.baseline_plan, cfg.baseline_fraction))
        if plan == "shards":
            return Stage(phase, slice_, plans.shard_samples(self.shards, phase, slice_,
                                                            self.deleted), None)
        if plan == "full":
            working = plans.working_set(self.chunks, phase, self.deleted)
            return Stage(phase, slice_, [working] * group.members, None)
        pool = plans.pool(plan, self.chunks, phase, self.deleted)
        samples = plans.draw_samples(group.rng, plan, fraction, group.members, self.chunks,
                                     phase, self.deleted)
        return Stage(phase, slice_, list(samples), pool)

    def snapshot(self, t: int, members: np.ndarray) -> None:
        """Records ``members``' current state and lineage as their state at stage ``t``."""
        state, seen = self.ens.host_state(), self.ens.lineage.seen.copy()
        if not self.snapshot_optimizer:
            state = state._replace(opt_state=None)
        if t in self.snapshots and not members.all():
            old_state, old_seen = self.snapshots[t]

            def pick(new, old):
                return np.where(members.reshape((-1,) + (1,) * (old.ndim - 1)), new, old)

            state = jax.tree.map(pick, state, old_state)
            seen = np.where(members[:, None], seen, old_seen)
        self.snapshots[t] = (state, seen)

    def replay(self, group: ModelGroup, source: str, members: np.ndarray, points: np.ndarray,
               upto: int, kind: str) -> dict:
        """Retrains ``members`` of ``group`` forward from their stage ``points`` (the state
        they hold now) to stage ``upto``, on each stage's samples of ``source`` minus the
        deleted ids, with the batch order of the run. Returns the cost."""
        cfg = self.cfg
        cost = {"member_epochs": 0, "member_examples": 0, "seconds": 0.0}
        if not members.any():
            return cost
        for t in range(int(points[members].min()) + 1, upto + 1):
            active = members & (points < t)
            stage = self.stages[source][t]
            if cfg.reset_optimizer_each_phase and stage.slice == 1:
                group.reset_optimizer(active)
            self.bar.total += cfg.epochs
            seconds, examples = self.train_stage(group, source, t,
                                                 plans.without(stage.samples, self.deleted),
                                                 active, kind)
            cost["member_epochs"] += int(active.sum()) * cfg.epochs
            cost["member_examples"] += examples
            cost["seconds"] += seconds
            if self.snapshots is not None and group is self.ens:
                self.snapshot(t, active)
        return cost

    def oracle_cost(self, source: str, upto: int) -> dict:
        """What retraining every member of ``source`` from scratch on stages ``1..upto`` minus
        the deleted ids costs (computed, not run)."""
        members = self.cfg.members if source == "ensemble" else 1
        examples = sum(len(s) for t in range(1, upto + 1)
                       for s in plans.without(self.stages[source][t].samples, self.deleted))
        return {"member_epochs": members * upto * self.cfg.epochs,
                "member_examples": examples * self.cfg.epochs}

    def train_oracle(self, upto: int) -> tuple[ModelGroup, dict]:
        """The oracle reference: a fresh ensemble from the run's initial state retrained on
        stages ``1..upto`` minus the deleted ids."""
        if self.cfg.strategy == "oracle":
            return self.ens, {}
        if self.oracle is None or self.oracle_stage != upto or self.oracle_deleted != len(
                self.all_deleted):
            oracle = self.ens.fresh("oracle")
            cost = self.replay(oracle, "ensemble", np.ones(self.cfg.members, bool),
                               np.zeros(self.cfg.members, np.int64), upto, "oracle")
            self.oracle, self.oracle_stage, self.oracle_cost_measured = oracle, upto, cost
            self.oracle_deleted = len(self.all_deleted)
        return self.oracle, self.oracle_cost_measured

    # ---- phases --------------------------------------------------------------------------

    def deletions_after(self, phase: int) -> np.ndarray:
        """The ids deleted after ``phase``: from the explicit schedule, or drawn at random."""
        if self.schedule is not None:  # minus ids a `forget` request deleted already
            ids = np.asarray(sorted(self.schedule.get(phase, [])), np.int64)
            return ids[~self.deleted[ids]]
        if phase == self.cfg.phases:
            return np.zeros(0, np.int64)
        return deletions_lib.random_deletions(
            self.deletion_rng, plans.working_set(self.chunks, phase, self.deleted),
            self.cfg.deletion_rate, arrived=sum(len(c) for c in self.chunks[:phase]))

    def run_phase(self, phase: int) -> dict:
        """Trains every group on its samples of ``phase``, evaluates, deletes and unlearns,
        then makes it durable: a checkpoint, the purge of checkpoints that hold a deleted id,
        and the deletion log. Resumes inside the phase from ``self.position`` when set."""
        cfg, ens, base, labels = self.cfg, self.ens, self.base, self.test_labels
        resume, self.position = self.position, None
        t_phase = time.perf_counter()
        record: dict = (resume["record"] if resume else
                        {"phase": phase, "working_set": int(len(
                            plans.working_set(self.chunks, phase, self.deleted)))})
        seconds = record.setdefault("seconds_by_model", {})
        order = [("ensemble", ens), ("baseline", base)]
        for n, (source, group) in enumerate(order):
            if group is None:
                continue
            S = self.slices[source]
            for slice_ in range(1, S + 1):
                t = (phase - 1) * S + slice_
                start = (1, 0, None)
                if resume is not None:
                    done_before = [s_ for s_, _ in order].index(resume["source"])
                    if n < done_before or (n == done_before and slice_ < resume["slice"]):
                        continue
                    stage = self.stages[source][t]  # drawn before the checkpoint
                    start = (resume["epoch"], resume["step"], resume["loss"])
                    resume = None
                else:
                    if slice_ == 1 and cfg.reset_optimizer_each_phase:
                        group.reset_optimizer()
                    stage = self.stages[source][t] = self.draw(source, group, phase, slice_)
                secs, examples = self.train_stage(
                    group, source, t, stage.samples, np.ones(group.members, bool), start=start,
                    on_step=self.step_hook(phase, source, slice_, record))
                seconds[source] = seconds.get(source, 0.0) + secs
                self.training["member_epochs"] += group.members * cfg.epochs
                self.training["member_examples"] += examples
                self.training["seconds"] += secs
                if group is ens and self.snapshots is not None:
                    self.snapshot(t, np.ones(cfg.members, bool))
                if group is ens:
                    record["sample_size"] = int(round(np.mean([len(x) for x in stage.samples])))

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
        logged = []
        if ids.size:
            logged.append(self.log_request(ids, f"schedule (after phase {phase})"))
            record.update(self.delete(phase, ids, invalid, member_logits, seconds))
        self.phase_done = phase
        self.results["phases"].append(record)
        logged += self.apply_queued(phase)
        record["seconds"] = time.perf_counter() - t_phase
        self.emit({"kind": "phase", **record})
        self.log(_phase_line(record, cfg.phases))
        self.make_durable(logged)
        return record

    # ---- durability ----------------------------------------------------------------------

    def step_hook(self, phase: int, source: str, slice_: int, record: dict):
        """The per-step callback of phase training: a mid-phase checkpoint every
        ``checkpoint_every`` optimiser steps."""
        every = self.cfg.checkpoint_every

        def on_step(epoch: int, step: int, partial_loss) -> None:
            self.steps_done += 1
            if every and self.steps_done % every == 0:
                loss = partial_loss()  # raises TrainingDiverged: never checkpoint a NaN state
                self.position = {"phase": phase, "source": source, "slice": slice_,
                                 "epoch": epoch, "step": step, "loss": loss.tolist(),
                                 "record": record}
                self.checkpoint()
                self.trim()  # no deletion happens inside a phase: nothing else to purge
                self.position = None
            faults.point("phase.step")

        return on_step

    def log_request(self, ids: np.ndarray, source: str) -> int | None:
        """Records a deletion request in the log before it is applied; a request left pending
        by a killed process for the same ids and source is reused."""
        if self.requests is None:
            return None
        for known in self.requests.records():  # pending, or applied before a fallback
            if known["source"] == source and known["ids"] == ids.tolist():
                return known["id"]
        return self.requests.request(ids.tolist(), source)

    def apply_queued(self, phase: int) -> list[int]:
        """Applies the `forget` requests queued in the log while this run was going (single
        process only: other processes cannot read the log). Returns their request ids."""
        done = []
        for request in self.queued_requests():
            self.apply_request(request, phase)
            done.append(request["id"])
        return done

    def apply_request(self, request: dict, phase: int) -> dict:
        """Applies one `forget` request: its ids not deleted yet are invalidated, unlearned
        with the run's strategy, and scored; the record goes into ``results["requests"]``."""
        ids = np.asarray(sorted(set(request["ids"]) - set(self.all_deleted)), np.int64)
        record = {"request": request["id"], "phase": phase, "ids": ids.tolist(),
                  "source": request["source"]}
        if ids.size:
            invalid = self.ens.lineage.invalid(ids)
            record["invalidated"] = np.flatnonzero(invalid).tolist()
            record.update(self.delete(phase, ids, invalid, self.logits(self.ens), {}))
        else:
            record["invalidated"] = []
        if request["id"] is not None:
            self.applied_requests.append(request["id"])
        self.results.setdefault("requests", []).append(record)
        return record

    def reapply_logged_deletions(self, step: int, log: Callable[[str], None]) -> None:
        """After falling back to an older checkpoint: deletes again, at once, the ids the log
        says were deleted but checkpoint ``step`` predates (their checkpoints were damaged)."""
        if self.requests is None or jax.process_count() > 1:
            return
        logged, later = set(), set()
        for r in self.requests.records():
            if r["outcome"] != "applied":
                continue
            logged |= set(r["ids"])
            phase = _schedule_phase(r["source"])
            if phase is not None and phase > self.phase_done:
                later |= set(r["ids"])  # the replayed phase deletes them again itself
        missing = np.asarray(sorted(logged - later - set(self.all_deleted)), np.int64)
        if not missing.size:
            return
        if self.position is not None:
            raise checkpoint.CheckpointError(
                f"checkpoint {step} is inside phase {self.position['phase']} and predates the "
                f"logged deletion of ids {missing[:10].tolist()}, whose checkpoints are "
                f"damaged; restore them, or start a new run that deletes these ids")
        log(f"checkpoint {step} predates the logged deletion of {missing.size} id(s): "
            f"deleting them again now")
        if self.phase_done == 0:  # nothing trained yet: they are simply never drawn
            self.deleted[missing] = True
            self.all_deleted.extend(missing.tolist())
        else:
            self.apply_request({"id": None, "ids": missing.tolist(), "source":
                                f"re-applied after falling back to checkpoint {step}"},
                               self.phase_done)
        self.make_durable([])

    def make_durable(self, logged: list) -> None:
        """The durable step after a phase or a request: checkpoint, purge, then the log's
        outcomes and the results file (a crash anywhere in it is completed on resume)."""
        self.applied_requests += [r for r in logged if r is not None and r not in
                                  self.applied_requests]
        self.checkpoint()
        faults.point("checkpoint.before_purge")
        purged = self.purge()
        if self.primary:  # the live lineage, for `audit`
            self.ens.lineage.save(self.out / "lineage.npz", self.all_deleted)
        self.save_results()
        self.complete_requests(purged)

    def complete_requests(self, purged: list[int]) -> None:
        """Writes the outcome of every logged request this run has applied."""
        if self.requests is None:
            return
        events = {}
        for record in self.results["phases"]:
            if record.get("deleted_ids"):
                events[f"schedule (after phase {record['phase']})"] = record
        by_request = {r["request"]: r for r in self.results.get("requests", [])}
        for pending in self.requests.pending():
            record = by_request.get(pending["id"]) or events.get(pending["source"])
            if pending["id"] not in self.applied_requests or record is None:
                continue
            faults.point("forget.before_outcome")
            cost = record.get("cost", {})
            self.requests.outcome(
                pending["id"], "applied", members_invalidated=record.get("invalidated", []),
                strategy=self.cfg.strategy,
                cost={k: cost.get(k) for k in ("member_epochs", "member_examples", "seconds")},
                checkpoints_purged=[str(p) for p in purged],
                message=("nothing left to delete: already deleted" if not record.get(
                    "ids", record.get("deleted_ids")) else ""))

    def checkpoint(self) -> int:
        """Writes the next checkpoint. Every process gathers the state (a collective); the
        primary one writes it."""
        self.ckpt_step += 1
        state, lineage, plan, meta = self.capture()
        if self.primary:
            self.ckpts.save(self.ckpt_step, state, lineage, plan, meta)
        return self.ckpt_step

    def trim(self) -> list[int]:
        """Deletes all but the newest ``keep_checkpoints`` complete checkpoints."""
        if not self.primary:
            return []
        old = self.ckpts.steps()[:-self.cfg.keep_checkpoints]
        for step in old:
            self.ckpts.delete(step)
        return old

    def purge(self) -> list[int]:
        """Deletes every kept checkpoint but the newest whose lineage holds a deleted id, and
        all but the newest ``keep_checkpoints``. Returns the deleted steps."""
        if not self.primary:
            return []
        purged = self.trim()  # first: no need to read what goes anyway
        deleted = np.asarray(sorted(self.all_deleted), np.int64)
        for step in self.ckpts.steps()[:-1] if deleted.size else []:
            try:
                lineage = self.ckpts.load(step, ("lineage",))["lineage"]
                dirty = bool(lineage_violations(lineage, deleted, self.baseline_oracle))
            except checkpoint.CheckpointError:
                dirty = True  # unreadable: it cannot be shown clean, so it goes
            if dirty:
                self.ckpts.delete(step)
                purged.append(step)
        return purged

    def capture(self) -> tuple[dict, dict, dict, dict]:
        """Everything a resumed run needs, as (state, lineage, plan, meta) checkpoint items."""
        state = {"ensemble": _flatten(self.ens.host_state())}
        lineage = {"ensemble": {"seen": self.ens.lineage.seen, "born": self.ens.lineage.born}}
        if self.base is not None:
            state["baseline"] = _flatten(self.base.host_state())
            lineage["baseline"] = {"seen": self.base.lineage.seen, "born": self.base.lineage.born}
        if self.snapshots:
            state["snapshots"] = {f"t{t}": _flatten(st) for t, (st, _) in self.snapshots.items()}
            lineage["snapshots"] = {f"t{t}": seen for t, (_, seen) in self.snapshots.items()}
        plan, stages = {}, {}
        for source, by_t in self.stages.items():
            for t, stage in by_t.items():
                packed = checkpoint.pack_ragged(stage.samples)
                if stage.pool is not None:
                    packed["pool"] = checkpoint.pack_ids(stage.pool)
                plan[f"{source}_t{t}"] = packed
                stages.setdefault(source, {})[str(t)] = [stage.phase, stage.slice,
                                                          stage.pool is not None]
        if not plan:
            plan = {"empty": checkpoint.pack_ids([])}
        self.metrics_file.flush()
        meta = {
            "format": 1, "config": self.cfg.to_dict(), "phase_done": self.phase_done,
            "position": self.position, "steps_done": self.steps_done,
            "checkpoint": self.ckpt_step, "deleted": list(self.all_deleted),
            "replacements": self.replacements, "rounds": self.rounds, "stages": stages,
            "rngs": {"ensemble": self.ens.rng.bit_generator.state,
                     "baseline": self.base.rng.bit_generator.state if self.base else None,
                     "deletions": self.deletion_rng.bit_generator.state,
                     "retrain": self.retrain_rng.bit_generator.state},
            "training": self.training, "events": self.events, "elapsed": self.elapsed(),
            "applied_requests": self.applied_requests, "results": self.results,
            "metrics_bytes": self.metrics_file.tell() if self.primary else 0,
        }
        return state, lineage, plan, meta

    def load(self, step: int, loaded: dict) -> None:
        """Puts the run back in the state checkpoint ``step`` recorded."""
        state, lineage, plan, meta = (loaded[k] for k in checkpoint.ITEMS)
        self.ens.set_state(_unflatten(self.ens.host_state(), state["ensemble"]))
        self.ens.lineage.seen[:] = lineage["ensemble"]["seen"]
        self.ens.lineage.born[:] = lineage["ensemble"]["born"]
        if self.base is not None:
            self.base.set_state(_unflatten(self.base.host_state(), state["baseline"]))
            self.base.lineage.seen[:] = lineage["baseline"]["seen"]
            self.base.lineage.born[:] = lineage["baseline"]["born"]
        if self.snapshots is not None:
            like = self.snapshots[0][0]
            self.snapshots = {int(k[1:]): (_unflatten(like, v), lineage["snapshots"][k])
                              for k, v in state["snapshots"].items()}
        for source, by_t in meta["stages"].items():
            for t, (phase, slice_, has_pool) in by_t.items():
                packed = plan[f"{source}_t{t}"]
                self.stages[source][int(t)] = Stage(
                    phase, slice_, checkpoint.unpack_ragged(packed),
                    checkpoint.unpack_ids(packed["pool"]) if has_pool else None)
        self.phase_done, self.position = meta["phase_done"], meta["position"]
        self.steps_done, self.ckpt_step = meta["steps_done"], step
        self.all_deleted = list(meta["deleted"])
        self.deleted[:] = False
        self.deleted[self.all_deleted] = True
        self.replacements, self.rounds = meta["replacements"], meta["rounds"]
        self.ens.rng.bit_generator.state = meta["rngs"]["ensemble"]
        if self.base is not None:
            self.base.rng.bit_generator.state = meta["rngs"]["baseline"]
        self.deletion_rng.bit_generator.state = meta["rngs"]["deletions"]
        self.retrain_rng.bit_generator.state = meta["rngs"]["retrain"]
        self.training, self.events = meta["training"], meta["events"]
        self.elapsed_before, self.t0 = meta["elapsed"], time.perf_counter()
        self.applied_requests = list(meta["applied_requests"])
        self.results = meta["results"]
        if self.primary:  # drop what the killed process logged after this checkpoint
            self.metrics_file.close()
            with open(self.out / "metrics.jsonl", "r+b") as f:
                if os.fstat(f.fileno()).st_size > meta["metrics_bytes"]:
                    f.truncate(meta["metrics_bytes"])
            self.metrics_file = open(self.out / "metrics.jsonl", "a", buffering=1)

    def rewind_points(self, ids: np.ndarray, invalid: np.ndarray) -> np.ndarray:
        """For each invalid member, its last recorded stage whose lineage holds none of
        ``ids`` (0, the initial state, always qualifies); -1 for the others."""
        points = np.full(self.cfg.members, -1, np.int64)
        for i in np.flatnonzero(invalid):
            points[i] = max(t for t, (_, seen) in self.snapshots.items()
                            if not seen[i, ids].any())
        return points

    def restore(self, points: np.ndarray) -> None:
        """Restores each member with a point (>= 0) to its snapshot at that stage."""
        current_opt = None if self.snapshot_optimizer else self.ens.host_state().opt_state
        for t in np.unique(points[points >= 0]):
            mask = points == t
            state, seen = self.snapshots[int(t)]
            if state.opt_state is None:  # reset before the replay trains: keep the current
                state = state._replace(opt_state=current_opt)
            self.ens.set_members(mask, state)
            self.ens.lineage.seen[mask] = seen[mask]

    def apply_strategy(self, phase: int, ids: np.ndarray, invalid: np.ndarray) -> dict:
        """Unlearns ``ids`` (already marked deleted) from the ensemble with the run's strategy;
        returns the cost and which members are live afterwards."""
        cfg, ens = self.cfg, self.ens
        upto = phase * self.slices["ensemble"]
        cost = {"member_epochs": 0, "member_examples": 0, "seconds": 0.0}
        live = np.ones(cfg.members, bool)
        if cfg.strategy == "replace":
            ens.unlearn(jax.random.fold_in(self.k_unlearn, phase), invalid)
            ens.lineage.reset(invalid, phase)
            self.replacements += int(invalid.sum())
            if phase < cfg.phases:
                live = ~invalid  # the fresh members join the next phase
            elif invalid.any():
                self.rounds += 1
                stage = self.retrain_stage(phase)
                self.bar.total += cfg.epochs
                seconds, examples = self.train_stage(ens, "ensemble", upto, stage.samples,
                                                     invalid, "retrain", self.rounds)
                cost = {"member_epochs": int(invalid.sum()) * cfg.epochs,
                        "member_examples": examples, "seconds": seconds}
        elif cfg.strategy == "rewind":
            points = self.rewind_points(ids, invalid)
            self.restore(points)
            cost = self.replay(ens, "ensemble", invalid, points, upto, "rewind")
            self.replacements += int(invalid.sum())
            cost["rewound_to"] = {int(i): int(points[i]) for i in np.flatnonzero(invalid)}
        else:  # oracle
            everyone = np.ones(cfg.members, bool)
            ens.state, ens.lineage = ens.initial_state(), Lineage.empty(cfg.members, self.n_train)
            cost = self.replay(ens, "ensemble", everyone, np.zeros(cfg.members, np.int64), upto,
                               "oracle")
            self.replacements += cfg.members
        return {"cost": cost, "live": live}

    def retrain_stage(self, phase: int) -> Stage:
        """``replace`` after the last phase: a new draw of the last stage's plan (shards: the
        member's own shard), without the deleted ids."""
        cfg = self.cfg
        if cfg.plan == "shards":
            return self.draw("ensemble", self.ens, phase, self.slices["ensemble"])
        samples = plans.draw_samples(self.retrain_rng, cfg.plan, cfg.fraction, cfg.members,
                                     self.chunks, phase, self.deleted)
        return Stage(phase, 1, list(samples), None)

    def expected_invalidated(self, source: str, ids: np.ndarray, born: np.ndarray,
                             upto: int) -> float:
        """The expected number of members whose lineage holds any of ``ids``, from the plan:
        each member's probability of drawing none of them in the stages since its birth."""
        plan = self.cfg.plan if source == "ensemble" else self.cfg.baseline_plan
        expected = 0.0
        for i in range(len(born)):
            avoid = 1.0
            for t in range(1, upto + 1):
                stage = self.stages[source][t]
                if stage.phase > born[i]:
                    avoid *= plans.avoid_probability(plan, stage.pool, stage.samples[i], ids)
            expected += 1.0 - avoid
        return expected

    def assess(self, models: dict, forget: np.ndarray, retain: np.ndarray,
               test_logits: dict) -> dict:
        """forget/retain/test scores and the membership-inference attack of each model.

        ``models``: name -> (group, live mask or None); ``test_logits``: name -> test logits
        already computed (others are computed here)."""
        cfg = self.cfg
        out = {"forget": {}, "retain": {}, "test": {}, "mia": {}}
        for name, (group, live) in models.items():
            method = cfg.aggregation if group.members > 1 else "mean_logits"
            known = test_logits.get(name)
            # One pass over forget + retain (+ test) ids: a tiny forget set costs no extra batch.
            ids = np.concatenate([forget, retain] + ([group.test_ids] if known is None else []))
            logits = self.logits(group, ids)
            cut = len(forget) + len(retain)
            sets = {"forget": (logits[:, :len(forget)], self.train_labels[forget]),
                    "retain": (logits[:, len(forget):cut], self.train_labels[retain]),
                    "test": (logits[:, cut:] if known is None else known, self.test_labels)}
            losses = {}
            for which, (logits, labels) in sets.items():
                out[which][name], losses[which] = metrics.evaluate(logits, labels, live, method)
            if losses["forget"] is None:
                out["mia"][name] = {"n": 0, "skipped": "no deleted example or no live member"}
            else:
                out["mia"][name] = mia.loss_attack(losses["forget"], losses["test"],
                                                   folds=cfg.mia_folds, seed=cfg.seed)
        return out

    def retain_ids(self, phase: int) -> np.ndarray:
        """The retained training examples scored after ``phase``: its working set, at most
        ``retain_eval`` of them (a fixed random subset)."""
        working = plans.working_set(self.chunks, phase, self.deleted)
        if len(working) <= self.cfg.retain_eval:
            return working
        rng = np.random.default_rng([self.cfg.seed, _STREAM_EVAL, phase])
        return np.sort(rng.choice(working, self.cfg.retain_eval, replace=False))

    def delete(self, phase: int, ids: np.ndarray, invalid: np.ndarray,
               member_logits: np.ndarray, seconds: dict) -> dict:
        """Deletes ``ids`` after ``phase``: scores the ensemble before, unlearns with the run's
        strategy (and the baseline by oracle when asked), scores everything after, and
        accounts the cost. Returns the phase record's deletion blocks."""
        cfg, ens, base, labels = self.cfg, self.ens, self.base, self.test_labels
        upto = phase * self.slices["ensemble"]
        expected = self.expected_invalidated("ensemble", ids, ens.lineage.born, upto)
        forget = np.asarray(sorted(self.all_deleted + ids.tolist()), np.int64)
        before_models = {"ensemble_before": (ens, None)}
        before = self.assess(before_models, forget, self.retain_ids(phase),
                             {"ensemble_before": member_logits})
        self.deleted[ids] = True
        self.all_deleted.extend(ids.tolist())

        t0 = time.perf_counter()
        applied = self.apply_strategy(phase, ids, invalid)
        cost = {"strategy": cfg.strategy, "ids": int(ids.size),
                "invalidated_observed": int(invalid.sum()),
                "invalidated_expected": expected, **applied["cost"]}
        cost["seconds"] = time.perf_counter() - t0
        if "retrain" not in seconds and cost["member_epochs"]:
            seconds["unlearning"] = cost["seconds"]
        oracle_cost = self.oracle_cost("ensemble", upto)
        cost["oracle"] = dict(oracle_cost, seconds=None)
        if base is not None:
            cost["baseline"] = self.unlearn_baseline(phase, ids)

        models = {"ensemble": (ens, applied["live"])}
        train_oracle = cfg.strategy == "oracle" or cfg.oracle_reference == "deletions" or (
            cfg.oracle_reference == "end" and phase == cfg.phases)
        if train_oracle:
            oracle, measured = self.train_oracle(upto)
            if measured:
                cost["oracle"]["seconds"] = measured["seconds"]
            models["oracle"] = (oracle, None)
        if base is not None:
            models["baseline"] = (base, None)
        retrained = cfg.strategy != "replace" or phase == cfg.phases
        logits = self.logits(ens) if retrained else member_logits
        after = self.assess(models, forget, self.retain_ids(phase), {"ensemble": logits})
        ran = cost["member_examples"]
        cost["speedup_vs_oracle"] = (oracle_cost["member_examples"] / ran) if ran else None
        self.events.append(cost)

        record = {k: {**before[k], **after[k]} for k in ("forget", "retain", "test", "mia")}
        record["cost"] = cost
        record["after_unlearning"] = {
            "ensemble": metrics.aggregate(logits, labels, applied["live"], cfg.aggregation)}
        if retrained and invalid.any() or cfg.strategy == "oracle":
            record["after_unlearning"]["members"] = _member_records(
                logits, labels, np.ones(cfg.members, bool), ens.lineage.born)
        if self.baseline_oracle:
            record["after_unlearning"]["baseline"] = after["test"]["baseline"]
        return record

    def unlearn_baseline(self, phase: int, ids: np.ndarray) -> dict:
        """The baseline's unlearning: ``oracle`` (retrained from its initial state on its
        stages minus the deleted ids) when asked, else none (as in the original study)."""
        base = self.base
        invalid = bool(base.lineage.invalid(ids)[0])
        cost = {"unlearning": "oracle" if self.baseline_oracle else "none",
                "invalidated": invalid, "member_epochs": 0, "member_examples": 0,
                "seconds": 0.0, "oracle": self.oracle_cost("baseline", phase)}
        if self.baseline_oracle and invalid:
            base.state, base.lineage = base.initial_state(), Lineage.empty(1, self.n_train)
            cost.update(self.replay(base, "baseline", np.ones(1, bool), np.zeros(1, np.int64),
                                    phase, "oracle"))
        return cost

    def finish(self, wall_seconds: float) -> dict:
        """Writes the end state: ``final``, the forget/retain/test/MIA blocks against the
        oracle, the cost totals, the lineage audit, ``lineage.npz`` and the plot."""
        from jaxunlearn import plots

        cfg, labels = self.cfg, self.test_labels
        last = self.results["phases"][-1]
        final = {k: last[k] for k in ("phase", "deleted_ids", "invalidated", "seconds")}
        logits = self.logits(self.ens)  # the live state, after every deletion and request
        final["ensemble"] = metrics.aggregate(logits, labels, None, cfg.aggregation)
        final["members"] = _member_records(logits, labels, np.ones(cfg.members, bool),
                                           self.ens.lineage.born)
        final["baseline"] = (metrics.score(self.logits(self.base)[0], labels)
                             if self.base else None)
        upto = cfg.phases * self.slices["ensemble"]
        forget = np.asarray(sorted(self.all_deleted), np.int64)
        models = {"ensemble": (self.ens, None)}
        oracle_seconds = None
        if forget.size and (cfg.oracle_reference != "none" or cfg.strategy == "oracle"):
            oracle, measured = self.train_oracle(upto)
            models["oracle"] = (oracle, None)
            oracle_seconds = measured.get("seconds")
        if self.base is not None:
            models["baseline"] = (self.base, None)
        blocks = self.assess(models, forget, self.retain_ids(cfg.phases), {})
        before = [e for e in self.results["phases"] if "mia" in e]
        if before:
            blocks["mia"]["ensemble_before_last_deletion"] = before[-1]["mia"]["ensemble_before"]
        violations = self.ens.lineage.violations(self.all_deleted)
        snapshot_violations = (sum(int(seen[:, forget].sum()) for _, seen in
                                   self.snapshots.values()) if self.snapshots else 0)
        self.results.update({
            "complete": True,
            "final": final,
            **blocks,
            "cost": self.cost_totals(oracle_seconds),
            "deleted_ids": sorted(self.all_deleted),
            "replacements": self.replacements,
            "lineage_audit": {"ok": violations == 0 and snapshot_violations == 0,
                              "violations": violations, "members": cfg.members,
                              "deleted": len(self.all_deleted),
                              **({"snapshots": len(self.snapshots),
                                  "snapshot_violations": snapshot_violations}
                                 if self.snapshots is not None else {})},
            # The baseline is a reference model, as in the original study: it never trains on
            # a deleted id after its deletion but is not unlearned (unless baseline_unlearning
            # is oracle); this counts what it holds.
            "baseline_deleted_ids_in_lineage": (self.base.lineage.violations(self.all_deleted)
                                                if self.base else None),
            "wall_seconds": wall_seconds,
        })
        if self.primary:
            self.ens.lineage.save(self.out / "lineage.npz", self.all_deleted)
            self.save_results()
            plots.plot_phases(self.results, self.out / "plots" / "accuracy_loss.png")
        return self.results

    def cost_totals(self, oracle_seconds: float | None) -> dict:
        """The run's unlearning cost against the oracle's, summed over deletion events."""
        def total(key, events=self.events):
            return sum(e[key] for e in events)

        ran = total("member_examples")
        oracle = {"member_epochs": sum(e["oracle"]["member_epochs"] for e in self.events),
                  "member_examples": sum(e["oracle"]["member_examples"] for e in self.events)}
        out = {"strategy": self.cfg.strategy, "events": len(self.events),
               "ids": total("ids"), "member_epochs": total("member_epochs"),
               "member_examples": ran, "seconds": total("seconds"),
               "invalidated_observed": total("invalidated_observed"),
               "invalidated_expected": total("invalidated_expected"),
               "oracle": oracle, "oracle_final_seconds": oracle_seconds,
               "speedup_vs_oracle": oracle["member_examples"] / ran if ran else None,
               "training": dict(self.training)}
        if self.base is not None:
            base = [e["baseline"] for e in self.events]
            out["baseline"] = {"unlearning": "oracle" if self.baseline_oracle else "none",
                               "member_epochs": sum(b["member_epochs"] for b in base),
                               "member_examples": sum(b["member_examples"] for b in base),
                               "seconds": sum(b["seconds"] for b in base)}
        return out


# Settings a resumed run may change (with --allow-config-change): they change how the rest of
# the run trains, evaluates or is stored, not the shapes or meaning of what is checkpointed.
RESUMABLE_CHANGES = frozenset({
    "data", "eval_batch_size", "eval_every_epoch", "checkpoint_every", "keep_checkpoints",
    "oracle_reference", "retain_eval", "mia_folds", "member_parallel", "devices",
    "learning_rate", "weight_decay", "epochs", "batch_size"})


def data_fingerprint(ds: data_lib.Dataset) -> str:
    """A short hash of the labels and a few pixels: a resumed run checks it has its data."""
    h = hashlib.sha256()
    for x in (ds.train_labels, ds.test_labels, ds.train_images[:: max(1, ds.n_train // 64)]):
        h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()[:16]


def _open(cfg, ds, out, schedule, log, progress, purpose: str, wait: float = 0.0) -> Experiment:
    """Locks the run folder (the primary process), then builds its `Experiment`."""
    from jaxunlearn import runlock

    lock = contextlib.ExitStack()
    try:
        if jax.process_index() == 0:
            lock.enter_context(runlock.run_lock(out, wait=wait, purpose=purpose))
        return Experiment(cfg, ds, out, schedule, log,
                          sys.stderr.isatty() if progress is None else progress, lock)
    except BaseException:
        lock.close()
        raise


def prepare(cfg: Config, out_dir, dataset: data_lib.Dataset | None = None,
            log: Callable[[str], None] = print, progress: bool | None = None) -> Experiment:
    """Checks everything that can be checked (config, data, deletion schedule), then creates
    the run folder ``out_dir`` (which must be new), locks it, and writes checkpoint 0."""
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
    exp = _open(cfg, ds, out, schedule, log, progress, "run")
    exp.checkpoint()  # step 0: the initial state
    exp.save_results()
    return exp


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
    exp = prepare(cfg, out_dir, dataset, log, progress)
    try:
        return exp.run_all()
    finally:
        exp.close()


def saved_config(run_dir) -> Config:
    """The configuration a run folder was made with."""
    path = pathlib.Path(run_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run folder (no config.json); pass the folder "
                          f"that `jaxunlearn run` printed")
    try:
        return Config(**json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path} is not a readable configuration: {e}") from None


def config_changes(old: Config, new: Config) -> dict[str, tuple]:
    return {f.name: (getattr(old, f.name), getattr(new, f.name))
            for f in dataclasses.fields(Config) if getattr(old, f.name) != getattr(new, f.name)}


def resume(run_dir, overrides=(), allow_config_change: bool = False,
           dataset: data_lib.Dataset | None = None, log: Callable[[str], None] = print,
           progress: bool | None = None, purpose: str = "run", wait: float = 0.0) -> Experiment:
    """Reopens a run folder at its newest complete checkpoint (checks first, changes nothing
    until the run is locked and its data and checkpoint are found).

    Raises ConfigError (a changed setting without ``allow_config_change``, or one that cannot
    change), DataError (the data is missing or is not the run's), `RunLocked` (another process
    has the run), or CheckpointError (no usable checkpoint)."""
    out = pathlib.Path(run_dir)
    old = saved_config(out)
    cfg = apply_overrides(old, list(overrides))
    changes = config_changes(old, cfg)
    if changes:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, b_a in changes.items()
                           for a, b in [b_a])
        fixed = sorted(set(changes) - RESUMABLE_CHANGES)
        if fixed:
            raise ConfigError(f"cannot resume {out} with a different {', '.join(fixed)} "
                              f"({listed}): the checkpoints depend on it; start a new run")
        if not allow_config_change:
            raise ConfigError(f"{out} was made with a different configuration ({listed}); "
                              f"pass --allow-config-change to resume with it, or drop the "
                              f"overrides")
    ds = dataset if dataset is not None else data_lib.load_dataset(cfg.data)
    ds = ds.limit(cfg.train_limit or None, cfg.test_limit or None)
    results_path = out / "results.json"
    if results_path.is_file():
        expected = json.loads(results_path.read_text()).get("data_fingerprint")
        if expected and expected != data_fingerprint(ds):
            raise data_lib.DataError(
                f"the data found ({ds.source}) is not the data {out} was trained on; pass "
                f"the run's dataset (data=PATH --allow-config-change)")
    check_config(cfg, ds.n_train)
    schedule = None
    if cfg.deletions:
        schedule = deletions_lib.load_schedule(cfg.deletions)
    exp = _open(cfg, ds, out, schedule, log, progress, purpose, wait)
    try:
        if exp.primary:
            gone = exp.ckpts.discard_incomplete()
            if gone:
                log(f"discarded incomplete checkpoint(s) {gone} (a write that never finished)")
        step, loaded = exp.ckpts.load_latest(log)
        position = loaded["meta"]["position"]
        moved = sorted({"epochs", "batch_size"} & set(changes))
        if position is not None and moved:
            raise ConfigError(f"checkpoint {step} is inside phase {position['phase']}: "
                              f"{', '.join(moved)} cannot change until the phase is over")
        if exp.primary:
            for bad in exp.ckpts.damaged:  # useless, and perhaps holding deleted ids
                exp.ckpts.delete(bad)
                log(f"removed damaged checkpoint {bad}")
            if changes:  # the accepted configuration is the run's from now on
                tmp = out / "config.json.tmp"
                tmp.write_text(cfg.to_json())
                os.replace(tmp, out / "config.json")
        exp.load(step, loaded)
        exp.results["config"] = cfg.to_dict()
        exp.reapply_logged_deletions(step, log)
        # Finish a durable step a crash interrupted: the purge and the log's outcomes.
        exp.complete_requests(exp.purge())
        where = (f"inside phase {exp.position['phase']}" if exp.position else
                 f"after phase {exp.phase_done}")
        log(f"resuming {out} from checkpoint {step} ({where})")
    except BaseException:
        exp.close()
        raise
    return exp


def baseline_unlearned(cfg: Config) -> bool:
    """Whether the run retrains its baseline by oracle at each deletion."""
    return cfg.baseline != "none" and (
        cfg.baseline_unlearning == "oracle"
        or (cfg.baseline_unlearning == "auto" and cfg.strategy == "oracle"))


def _schedule_phase(source: str) -> int | None:
    """The phase of a scheduled deletion's log source, ``"schedule (after phase K)"``."""
    match = re.fullmatch(r"schedule \(after phase (\d+)\)", source)
    return int(match.group(1)) if match else None


def lineage_violations(lineage: dict, deleted: np.ndarray, baseline_unlearned: bool) -> list:
    """(where, member, ids) for each lineage matrix of a checkpoint's ``lineage`` item that
    holds one of ``deleted``: the live members, each rewind snapshot, and the baseline when it
    is unlearned (a baseline the config leaves as a reference is reported by `audit`)."""
    out = []

    def check(where, seen):
        seen = np.asarray(seen)
        hit = seen[:, deleted]
        for member in np.flatnonzero(hit.any(axis=1)):
            out.append((where, int(member), deleted[hit[member]].tolist()))

    check("live ensemble", lineage["ensemble"]["seen"])
    for key, seen in sorted(lineage.get("snapshots", {}).items(), key=lambda kv: int(kv[0][1:])):
        check(f"rewind snapshot of stage {key[1:]}", seen)
    if baseline_unlearned and "baseline" in lineage:
        check("baseline", lineage["baseline"]["seen"])
    return out


def _flatten(tree) -> dict:
    """A pytree's leaves as ``{"00000": leaf, ...}`` (orbax keeps the dict; the structure
    comes back from a freshly initialised state)."""
    return {f"{i:05d}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(tree))}


def _unflatten(like, flat: dict):
    leaves = [np.asarray(flat[k]) for k in sorted(flat)]
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def _phase_line(r: dict, phases: int) -> str:
    e, b = r["ensemble"], r["baseline"]
    text = f"phase {r['phase']}/{phases}: ensemble acc {e['test_accuracy']:.4f}"
    if e["test_loss"] is not None:  # vote has no loss
        text += f" loss {e['test_loss']:.4f}"
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
