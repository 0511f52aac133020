"""The phase loop: train the ensemble and the baseline chunk by chunk, delete, unlearn, report.

`run(config, out_dir)` is the whole experiment. It writes into ``out_dir`` (which must be new):
``config.json``, ``metrics.jsonl`` (one line per epoch and per phase), ``results.json`` (rewritten
atomically after every phase, ``"complete": true`` at the end), ``lineage.npz`` and
``plots/accuracy_loss.png``.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import platform
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn import data as data_lib
from jaxunlearn import deletions as deletions_lib
from jaxunlearn import ensemble, metrics, plans, unlearn
from jaxunlearn.config import Config, ConfigError
from jaxunlearn.lineage import Lineage
from jaxunlearn.models import ARCHITECTURES, STEMS, make_model
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
    need(cfg.plan in plans.PLANS, f"unknown plan {cfg.plan!r}; choose one of {plans.PLANS}")
    need(cfg.aggregation in metrics.AGGREGATIONS,
         f"unknown aggregation {cfg.aggregation!r}; choose one of {metrics.AGGREGATIONS}")
    need(0 < cfg.fraction <= 1 and 0 < cfg.baseline_fraction <= 1, "fractions must be in (0, 1]")
    need(0 <= cfg.deletion_rate < 1, f"deletion_rate must be in [0, 1), got {cfg.deletion_rate}")
    need(n_train >= cfg.phases, f"{n_train} training examples cannot fill {cfg.phases} phases")
    try:
        unlearn.check_strategy(cfg.strategy)
        ensemble.resolve_strategy(cfg.member_parallel)
        make_optimizer(cfg.optimizer, cfg.learning_rate, cfg.weight_decay)
    except ValueError as e:
        raise ConfigError(str(e)) from None
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


class Compiled(NamedTuple):
    """A model, its optimiser and their jitted ensemble functions (state buffers donated)."""

    model: Any
    tx: Any
    strategy: str
    init: Callable
    step: Callable
    logits: Callable
    unlearn: Callable
    reset_optimizer: Callable


@functools.lru_cache(maxsize=16)
def compile_group(arch: str, stem: str, optimizer: str, learning_rate: float, weight_decay: float,
                  member_parallel: str, augment: bool) -> Compiled:
    """Builds (once per process and setting) the jitted functions of one model group, so that
    repeated runs in one process, as in sweeps and tests, reuse their compilations."""
    model = make_model(arch, stem)
    tx = make_optimizer(optimizer, learning_rate, weight_decay)
    strategy = ensemble.resolve_strategy(member_parallel)
    return Compiled(
        model=model, tx=tx, strategy=strategy,
        init=jax.jit(functools.partial(ensemble.init_ensemble, model, tx), static_argnums=1),
        step=jax.jit(ensemble.make_train_step(model, tx, strategy, augment), donate_argnums=0),
        logits=jax.jit(ensemble.make_eval_logits(model, strategy)),
        unlearn=jax.jit(unlearn.make_unlearn(model, tx), donate_argnums=1),
        reset_optimizer=jax.jit(functools.partial(ensemble.reset_optimizer, tx), donate_argnums=0))


class ModelGroup:
    """One stacked group of members (the ensemble, or the baseline as a group of one), with its
    jitted steps, its lineage and its host random stream. Driver-side: it owns mutable state."""

    def __init__(self, name: str, arch: str, members: int, cfg: Config, key, n_train: int,
                 rng: np.random.Generator):
        self.name = name
        fns = compile_group(arch, cfg.stem, cfg.optimizer, cfg.learning_rate, cfg.weight_decay,
                            cfg.member_parallel, cfg.augment)
        self.strategy = fns.strategy
        self.step, self.logits = fns.step, fns.logits
        self.unlearn, self.reset_optimizer = fns.unlearn, fns.reset_optimizer
        self.state = fns.init(key, members)
        self.lineage = Lineage.empty(members, n_train)
        self.rng = rng
        self.members = members

    def train(self, arrays, samples: np.ndarray, epochs: int, batch_size: int,
              active: np.ndarray, on_epoch: Callable[[int, np.ndarray], None]) -> None:
        """Trains the ``active`` members for ``epochs`` on their ``samples`` (int ``[m, s]``)."""
        images, labels = arrays
        active_dev = jnp.asarray(active)
        for epoch in range(1, epochs + 1):
            idx, weight = plans.epoch_batches(self.rng, samples, batch_size)
            idx_dev, weight_dev = jnp.asarray(idx), jnp.asarray(weight)
            loss_sum = jnp.zeros(self.members, jnp.float32)
            for s in range(idx.shape[0]):
                self.state, loss = self.step(self.state, images, labels, idx_dev[s],
                                             weight_dev[s], active_dev)
                loss_sum = loss_sum + loss
            self.lineage.record(idx, weight, active)
            check_finite(np.asarray(loss_sum), self.name, epoch)
            on_epoch(epoch, np.asarray(loss_sum) / samples.shape[1])

    def member_logits(self, images, n: int, batch_size: int) -> np.ndarray:
        """Logits of every member on the first ``n`` resident images: ``[m, n, classes]``."""
        out = []
        for start in range(0, n, batch_size):
            idx = np.arange(start, start + batch_size) % n  # pad the last batch by wrapping
            out.append(np.asarray(self.logits(self.state, images, jnp.asarray(idx, jnp.int32))))
        return np.concatenate(out, axis=1)[:, :n]


def check_finite(loss_sums: np.ndarray, name: str, epoch: int) -> None:
    bad = np.flatnonzero(~np.isfinite(loss_sums))
    if bad.size:
        raise FloatingPointError(f"{name} member(s) {bad.tolist()} reached a non-finite loss in "
                                 f"epoch {epoch}; lower the learning rate")


def _member_records(logits, labels, valid, born) -> list[dict]:
    return [dict(member=i, **metrics.score(logits[i], labels), valid=bool(valid[i]),
                 born=int(born[i])) for i in range(logits.shape[0])]


def _write_json(path: pathlib.Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


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
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    ds = dataset if dataset is not None else data_lib.load_dataset(cfg.data)
    ds = ds.limit(cfg.train_limit or None, cfg.test_limit or None)
    n_train, n_test = ds.n_train, ds.n_test
    check_config(cfg, n_train)
    chunks = plans.make_chunks(n_train, cfg.phases)
    schedule = None
    if cfg.deletions:
        schedule = deletions_lib.load_schedule(cfg.deletions)
        deletions_lib.validate_schedule(schedule, chunks)

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=False)
    (out / "plots").mkdir()
    (out / "config.json").write_text(cfg.to_json())
    metrics_file = open(out / "metrics.jsonl", "a", buffering=1)

    key = jax.random.PRNGKey(cfg.seed)
    k_ens, k_base, k_unlearn = jax.random.split(key, 3)
    rngs = [np.random.default_rng([cfg.seed, s]) for s in range(4)]
    train_arrays = (jax.device_put(ds.train_images), jax.device_put(ds.train_labels))
    test_images = jax.device_put(ds.test_images)
    test_labels = ds.test_labels

    ens = ModelGroup("ensemble", cfg.model, cfg.members, cfg, k_ens, n_train, rngs[_STREAM_ENSEMBLE])
    groups = [ens]
    base = None
    if cfg.baseline != "none":
        base = ModelGroup("baseline", cfg.baseline, 1, cfg, k_base, n_train, rngs[_STREAM_BASELINE])
        groups.append(base)

    deleted = np.zeros(n_train, bool)
    all_deleted: list[int] = []
    replacements = 0
    results = {
        "complete": False, "config": cfg.to_dict(), "data_source": ds.source,
        "n_train": n_train, "n_test": n_test, "member_parallel": ens.strategy,
        "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "flax": _version("flax"), "optax": _version("optax")},
        "phases": [],
    }
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=cfg.phases * cfg.epochs * len(groups), disable=not show, unit="epoch",
               leave=False, dynamic_ncols=True)

    def emit(record: dict) -> None:
        metrics_file.write(json.dumps(record) + "\n")

    def train_group(group: ModelGroup, phase: int, samples: np.ndarray, active: np.ndarray,
                    kind: str = "epoch") -> float:
        t0 = time.perf_counter()

        def on_epoch(epoch: int, train_loss: np.ndarray) -> None:
            bar.set_description(f"phase {phase}/{cfg.phases} {group.name}")
            bar.update(1)
            line = {"kind": kind, "phase": phase, "model": group.name, "epoch": epoch,
                    "train_loss": [float(x) if a else None for x, a in zip(train_loss, active)],
                    "seconds": time.perf_counter() - t0}
            if cfg.eval_every_epoch:
                logits = group.member_logits(test_images, n_test, cfg.eval_batch_size)
                line["members"] = [metrics.score(l, test_labels) for l in logits]
                if group is ens:
                    line["ensemble"] = metrics.aggregate(logits, test_labels, None, cfg.aggregation)
            emit(line)

        group.train(train_arrays, samples, cfg.epochs, cfg.batch_size, active, on_epoch)
        return time.perf_counter() - t0

    try:
        for phase in range(1, cfg.phases + 1):
            t_phase = time.perf_counter()
            record: dict = {"phase": phase,
                            "working_set": int(len(plans.working_set(chunks, phase, deleted)))}
            seconds = {}
            for group, plan, fraction in ((ens, cfg.plan, cfg.fraction),
                                          (base, "bootstrap", cfg.baseline_fraction)):
                if group is None:
                    continue
                samples = plans.draw_samples(group.rng, plan, fraction, group.members, chunks,
                                             phase, deleted)
                if cfg.reset_optimizer_each_phase:
                    group.state = group.reset_optimizer(group.state)
                seconds[group.name] = train_group(group, phase, samples,
                                                  np.ones(group.members, bool))
                if group is ens:
                    record["sample_size"] = int(samples.shape[1])

            member_logits = ens.member_logits(test_images, n_test, cfg.eval_batch_size)
            record["ensemble"] = metrics.aggregate(member_logits, test_labels, None, cfg.aggregation)
            record["aggregations"] = {a: metrics.aggregate(member_logits, test_labels, None, a)
                                      for a in metrics.AGGREGATIONS}
            record["baseline"] = (metrics.score(base.member_logits(test_images, n_test,
                                                                   cfg.eval_batch_size)[0], test_labels)
                                  if base else None)

            # Deletions after this phase.
            if schedule is not None:
                ids = np.asarray(sorted(schedule.get(phase, [])), np.int64)
            elif phase < cfg.phases:
                ids = deletions_lib.random_deletions(
                    rngs[_STREAM_DELETIONS], plans.working_set(chunks, phase, deleted),
                    cfg.deletion_rate, arrived=sum(len(c) for c in chunks[:phase]))
            else:
                ids = np.zeros(0, np.int64)
            invalid = ens.lineage.invalid(ids)
            record["deleted_ids"] = ids.tolist()
            record["invalidated"] = np.flatnonzero(invalid).tolist()
            record["members"] = _member_records(member_logits, test_labels, ~invalid,
                                                ens.lineage.born)
            if ids.size:
                deleted[ids] = True
                all_deleted.extend(ids.tolist())
                k_now = jax.random.fold_in(k_unlearn, phase)
                ens.state = ens.unlearn(k_now, ens.state, jnp.asarray(invalid))
                ens.lineage.reset(invalid, phase)
                replacements += int(invalid.sum())
                after = {"ensemble": metrics.aggregate(member_logits, test_labels, ~invalid,
                                                       cfg.aggregation)}
                if phase == cfg.phases and invalid.any():
                    # No next phase to join: retrain the fresh members now on a new draw.
                    samples = plans.draw_samples(rngs[_STREAM_RETRAIN], cfg.plan, cfg.fraction,
                                                 cfg.members, chunks, phase, deleted)
                    bar.total += cfg.epochs
                    seconds["retrain"] = train_group(ens, phase, samples, invalid, kind="retrain")
                    logits = ens.member_logits(test_images, n_test, cfg.eval_batch_size)
                    after["ensemble"] = metrics.aggregate(logits, test_labels, None, cfg.aggregation)
                    after["members"] = _member_records(logits, test_labels, np.ones(cfg.members, bool),
                                                       ens.lineage.born)
                record["after_unlearning"] = after
            record["seconds"] = time.perf_counter() - t_phase
            record["seconds_by_model"] = seconds
            results["phases"].append(record)
            emit({"kind": "phase", **record})
            log(_phase_line(record, cfg.phases))
            _write_json(out / "results.json", results)
    finally:
        bar.close()
        metrics_file.close()

    last = results["phases"][-1]
    final = {k: last[k] for k in ("phase", "deleted_ids", "invalidated", "ensemble", "baseline",
                                  "members", "seconds")}
    if "members" in last.get("after_unlearning", {}):
        final["ensemble"] = last["after_unlearning"]["ensemble"]
        final["members"] = last["after_unlearning"]["members"]
    violations = ens.lineage.violations(all_deleted)
    results.update({
        "complete": True,
        "final": final,
        "deleted_ids": sorted(all_deleted),
        "replacements": replacements,
        "lineage_audit": {"ok": violations == 0, "violations": violations,
                          "members": cfg.members, "deleted": len(all_deleted)},
        # The baseline is a reference model, as in the original study: it never trains on a
        # deleted id after its deletion but is not unlearned; this counts what it still holds.
        "baseline_deleted_ids_in_lineage": base.lineage.violations(all_deleted) if base else None,
        "wall_seconds": time.perf_counter() - t_start,
    })
    ens.lineage.save(out / "lineage.npz", all_deleted)
    _write_json(out / "results.json", results)
    from jaxunlearn import plots
    plots.plot_phases(results, out / "plots" / "accuracy_loss.png")
    return results


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
