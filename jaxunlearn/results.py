"""What a run tells: ``results.json``, ``metrics.jsonl``, one line per phase and a progress bar,
all through one writer (`Report`), which hears of training through `EpochLog`.

With several processes (hosts) every process computes everything and only the first writes.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Callable

import numpy as np

from jaxunlearn import metrics, plugins, records
from jaxunlearn.config import Config
from jaxunlearn.files import atomic_write
from jaxunlearn.folder import RunFolder
from jaxunlearn.trainer import EpochEnd, Listener


class Report:
    """The run's results (a dict rewritten atomically as ``results.json``), its metrics log,
    its printed lines and its progress bar."""

    def __init__(self, cfg: Config, out: pathlib.Path, header: records.Header,
                 log: Callable[[str], None], progress: bool, primary: bool,
                 planned_epochs: int):
        """``header``: the results' fixed fields (data, device, versions...); ``planned_epochs``
        sizes the progress bar (retraining extends it)."""
        from tqdm.auto import tqdm

        self.cfg, self.out, self.log, self.primary = cfg, out, log, primary
        self.results: records.Results = {"complete": False, "config": plugins.describe(cfg), **header,
                                         "phases": []}
        self.bar = tqdm(total=planned_epochs, disable=not progress, unit="epoch", leave=False,
                        dynamic_ncols=True)
        self._metrics_path = RunFolder(out).metrics
        self._plotted = -1  # phases in the plot drawn last
        self.metrics = open(self._metrics_path if primary else os.devnull, "a", buffering=1)

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()

    def emit(self, line: dict) -> None:
        """Appends one JSON line to ``metrics.jsonl``."""
        self.metrics.write(json.dumps(line) + "\n")

    def epoch(self, line: dict, description: str) -> None:
        """One epoch's metrics line, and a step of the progress bar."""
        self.bar.set_description(description)
        self.bar.update(1)
        self.emit(line)

    def extend_progress(self, epochs: int) -> None:
        self.bar.total += epochs

    def phase(self, record: records.PhaseRecord) -> None:
        """A finished phase: its metrics line and its printed line."""
        self.emit({"kind": "phase", **record})
        self.log(phase_line(record, self.cfg.phases))

    def save(self) -> None:
        """Rewrites ``results.json`` atomically (a reader never sees a half-written file)."""
        if self.primary:
            atomic_write(RunFolder(self.out).results, json.dumps(self.results, indent=2))

    def plot(self) -> None:
        """Draws ``plots/accuracy_loss.png`` (per phase: it is drawn again only when the phases
        changed since)."""
        from jaxunlearn import plots

        path = RunFolder(self.out).plots / "accuracy_loss.png"
        if self.primary and (self._plotted != len(self.results["phases"]) or not path.exists()):
            plots.plot_phases(self.results, path)
            self._plotted = len(self.results["phases"])

    # ---- durable state -------------------------------------------------------------------

    @staticmethod
    def results_in(tree: dict) -> records.Results:
        """The results a checkpoint's state tree holds (`state_dict` under ``"report"``)."""
        return tree["report"]["results"]

    def state_dict(self) -> dict:
        self.metrics.flush()
        return {"results": self.results, "plotted": self._plotted,
                "metrics_bytes": self.metrics.tell() if self.primary else 0}

    def load_state_dict(self, state: dict) -> None:
        """Back to a checkpoint: its results, and the metrics log without the lines a killed
        process wrote after it."""
        self.results, self._plotted = state["results"], state["plotted"]
        if self.primary:
            self.metrics.close()
            with open(self._metrics_path, "r+b") as f:
                if os.fstat(f.fileno()).st_size > state["metrics_bytes"]:
                    f.truncate(state["metrics_bytes"])
            self.metrics = open(self._metrics_path, "a", buffering=1)


class EpochLog(Listener):
    """A run's `jaxunlearn.trainer.Listener`: each epoch's line in ``metrics.jsonl`` (with the
    members' and the ensemble's test scores when ``eval_every_epoch``) and a step of the
    progress bar, which a training beyond the planned phases extends."""

    def __init__(self, report: Report, cfg: Config, test_labels: np.ndarray,
                 test_logits: Callable):
        """``test_logits(group)``: the group's member logits on the test set (the run's cache,
        so that the last epoch's are the phase's own scores)."""
        self.report, self.cfg, self.test_labels = report, cfg, test_labels
        self.test_logits = test_logits

    def started(self, kind: str, epochs: int) -> None:
        if kind != "epoch":  # a phase's own epochs are in the plan already
            self.report.extend_progress(epochs)

    def epoch_done(self, end: EpochEnd) -> None:
        cfg, group, stage = self.cfg, end.group, end.stage
        line = {"kind": end.kind, "phase": stage.phase, "model": group.name, "epoch": end.epoch,
                "train_loss": end.train_loss, "seconds": end.seconds}
        if stage.slices > 1:
            line["slice"] = stage.slice
        if cfg.eval_every_epoch:
            logits = self.test_logits(group)
            line["members"] = [metrics.score(l, self.test_labels) for l in logits]
            if group.members > 1:
                line["ensemble"] = metrics.aggregate(logits, self.test_labels, group.voters(),
                                                     cfg.aggregation)
        self.report.epoch(line, f"phase {stage.phase}/{cfg.phases} {group.name}")


def phase_line(r: records.PhaseRecord, phases: int) -> str:
    e, b = r["ensemble"], r["baseline"]
    text = f"phase {r['phase']}/{phases}: ensemble acc {e['test_accuracy']:.4f}"
    if e["test_loss"] is not None:  # vote has no loss
        text += f" loss {e['test_loss']:.4f}"
    if b:
        text += f" | baseline acc {b['test_accuracy']:.4f} loss {b['test_loss']:.4f}"
    if r["deleted_ids"]:
        text += f" | deleted {len(r['deleted_ids'])}, invalidated members {r['invalidated']}"
        cost = r.get("cost") or {}
        if cost.get("seconds") is not None:
            text += f", {cost['strategy']} {cost['seconds']:.1f}s"
            if (cost.get("oracle") or {}).get("seconds"):
                text += f" (retraining from scratch: {cost['oracle']['seconds']:.1f}s)"
    return text + f" | {r['seconds']:.1f}s"


def summary_line(results: records.Results) -> str:
    f, audit = results["final"], results["lineage_audit"]
    verdict = "ok" if audit["ok"] else "FAILED"
    if audit.get("held_by_design"):
        verdict += (f" (approximate: live lineage holds {audit['held_by_design']} deleted "
                    f"id(s) by design)")
    return (f"final: ensemble acc {f['ensemble']['test_accuracy']:.4f}"
            + (f", baseline acc {f['baseline']['test_accuracy']:.4f}" if f["baseline"] else "")
            + f"; {len(results['deleted_ids'])} ids deleted, {results['replacements']} member "
              f"replacements{_deletion_costs(results)}; lineage audit {verdict}; "
              f"{results['wall_seconds']:.1f}s")


def _deletion_costs(results: records.Results) -> str:
    """What honouring the deletions cost the ensemble, and would have cost retraining it and
    the baseline from scratch at each deletion (their own measured training)."""
    cost = results.get("cost") or {}
    if not cost.get("events"):
        return ""
    text = (f" in {cost['seconds']:.1f}s of {cost['strategy']} (retraining the ensemble at "
            f"each deletion: {cost['oracle']['seconds']:.1f}s")
    retraining = (cost.get("baseline") or {}).get("retraining")
    if retraining:
        text += f"; the baseline: {retraining['seconds']:.1f}s"
    return text + ")"
