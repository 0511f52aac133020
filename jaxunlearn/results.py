"""What a run tells: ``results.json``, ``metrics.jsonl``, one line per phase and a progress bar,
all through one writer.

With several processes (hosts) every process computes everything and only the first writes.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Callable

from jaxunlearn.config import Config
from jaxunlearn.folder import RunFolder


class Report:
    """The run's results (a dict rewritten atomically as ``results.json``), its metrics log,
    its printed lines and its progress bar."""

    def __init__(self, cfg: Config, out: pathlib.Path, header: dict, log: Callable[[str], None],
                 progress: bool, primary: bool, planned_epochs: int):
        """``header``: the results' fixed fields (data, device, versions...); ``planned_epochs``
        sizes the progress bar (retraining extends it)."""
        from tqdm.auto import tqdm

        self.cfg, self.out, self.log, self.primary = cfg, out, log, primary
        self.results = {"complete": False, "config": cfg.to_dict(), **header, "phases": []}
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

    def phase(self, record: dict) -> None:
        """A finished phase: its metrics line and its printed line."""
        self.emit({"kind": "phase", **record})
        self.log(phase_line(record, self.cfg.phases))

    def save(self) -> None:
        """Rewrites ``results.json`` atomically (a reader never sees a half-written file)."""
        if self.primary:
            tmp = self.out / "results.json.tmp"
            tmp.write_text(json.dumps(self.results, indent=2))
            os.replace(tmp, RunFolder(self.out).results)

    def plot(self) -> None:
        """Draws ``plots/accuracy_loss.png`` (per phase: it is drawn again only when the phases
        changed since)."""
        from jaxunlearn import plots

        path = RunFolder(self.out).plots / "accuracy_loss.png"
        if self.primary and (self._plotted != len(self.results["phases"]) or not path.exists()):
            plots.plot_phases(self.results, path)
            self._plotted = len(self.results["phases"])

    # ---- durable state -------------------------------------------------------------------

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


def phase_line(r: dict, phases: int) -> str:
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


def summary_line(results: dict) -> str:
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


def _deletion_costs(results: dict) -> str:
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
