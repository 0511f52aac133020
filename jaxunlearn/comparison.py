"""The field's comparison table of unlearning methods, from finished run folders.

One row per run (its strategy), plus the oracle: forget, retain and test accuracy of the
ensemble after unlearning, the population membership-inference AUC (`jaxunlearn.mia`'s
logistic loss attack) and the per-example ones (offline LiRA with the ``lira`` evaluator,
online LiRA with ``lira_online``), each AUC with its spread over folds, the seconds unlearning
took, and the average gap to the oracle over the accuracy and MIA columns (the "Avg. Gap" of
SalUn, ICLR 2024): 0 means indistinguishable from retraining without the forgotten examples.
An attack on fewer than `MIN_EXAMPLES` forgotten examples gets no figure: the table says "too
few" and how many.

The oracle of a row is its own run's (``oracle_reference`` or ``strategy=oracle``), else the
first other run's: every run compared must share the data, the preset and every setting that
shapes training and deletions, so their oracles are one and the same model. `check` refuses
folders that do not.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import pathlib

from jaxunlearn import config as config_lib, plugins, records
from jaxunlearn.config import COMPARABLE_CHANGES, Config
from jaxunlearn.folder import RunFolder

COLUMNS = ("method", "exact", "forget_acc", "retain_acc", "test_acc", "mia_auc", "lira_auc",
           "lira_tpr_1pct", "online_auc", "online_tpr_1pct", "online_tpr_01pct", "seconds",
           "avg_gap")
# Each attack figure's spread over folds and its number of forgotten examples (CSV only).
DETAILS = ("mia_auc_std", "lira_auc_std", "online_auc_std", "attack_n")
GAP_COLUMNS = ("forget_acc", "retain_acc", "test_acc", "mia_auc")
# Forgotten examples an attack figure needs; with fewer, the table says so instead of a figure
# (an AUC from three examples is noise).
MIN_EXAMPLES = 20
TOO_FEW = "too few"


class ReportError(ValueError):
    """Run folders that cannot be compared; the message says why and what to do."""


def load(run_dir) -> records.Results:
    path = RunFolder(run_dir).results
    if not path.is_file():
        raise ReportError(f"{run_dir}: no results.json; pass finished run folders "
                          f"(`jaxunlearn run` writes one per run)")
    try:
        results = records.load(path)
    except records.RecordError as e:
        raise ReportError(f"{run_dir}: {e}") from None
    if not results.get("complete"):
        raise ReportError(f"{run_dir}: the run has not finished (results.json is not "
                          f"complete); resume it with `jaxunlearn run --resume {run_dir}`")
    if not results.get("deleted_ids"):
        raise ReportError(f"{run_dir}: the run deleted nothing, so there is no unlearning to "
                          f"compare; use runs with deletions (deletion_rate > 0)")
    plugins.read_config(results.get("config") or {}, path)  # their settings' rules
    return results


def check(runs: dict[str, records.Results]) -> None:
    """Raises ReportError unless every run shares the data and the training and deletion
    settings of the first."""
    names = list(runs)
    first = runs[names[0]]
    for name in names[1:]:
        other = runs[name]
        if other.get("data_fingerprint") != first.get("data_fingerprint"):
            raise ReportError(f"{name} used other data than {names[0]} ({other.get('data_source')}"
                              f" vs {first.get('data_source')}); compare runs on one dataset")
        if other["config"]["preset"] != first["config"]["preset"]:
            raise ReportError(f"{name} is preset {other['config']['preset']!r} but {names[0]} is "
                              f"{first['config']['preset']!r}; compare runs of one preset")
        # A setting a run's version did not have yet had its default.
        defaults = config_lib.defaults()
        setting = lambda results, k: results["config"].get(k, defaults.get(k))
        # A plug-in's setting only one of the runs has belongs to a plug-in only it uses (its
        # strategy, say), which the runs may differ in.
        core = {f.name for f in dataclasses.fields(Config)}
        differ = sorted(k for k in set(first["config"]) | set(other["config"])
                        if k not in COMPARABLE_CHANGES and k != plugins.KEY
                        and (k in core or (k in first["config"] and k in other["config"]))
                        and setting(other, k) != setting(first, k))
        if differ:
            shown = ", ".join(f"{k}={other['config'].get(k)!r} vs {first['config'].get(k)!r}"
                              for k in differ[:5])
            raise ReportError(f"{name} differs from {names[0]} in settings that change the "
                              f"trained models or the deletions ({shown}); compare runs that "
                              f"differ only in how they unlearn")


def _get(block: dict | None, model: str, *path):
    value = (block or {}).get(model)
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _attack(results: records.Results, block: str, model: str, *path):
    """An attack's figure at ``path`` and its entry's ``n``: `TOO_FEW` under `MIN_EXAMPLES`
    forgotten examples (or when the evaluator skipped it), None when not evaluated."""
    entry = _get(results.get(block), model)
    if not isinstance(entry, dict):
        return None, None
    n = entry.get("n", 0)
    if "skipped" in entry or n < MIN_EXAMPLES:
        return TOO_FEW, n
    return _get({"x": entry}, "x", *path), n


def _row(method: str, exact, results: records.Results, model: str, seconds) -> dict:
    row = {"method": method, "exact": exact,
           "forget_acc": _get(results.get("forget"), model, "accuracy"),
           "retain_acc": _get(results.get("retain"), model, "accuracy"),
           "test_acc": _get(results.get("test"), model, "accuracy"),
           "seconds": seconds}
    ns = []
    for column, block, path in (
            ("mia_auc", "mia", ("logistic", "auc")),
            ("mia_auc_std", "mia", ("logistic", "auc_std")),
            ("lira_auc", "lira", ("auc",)), ("lira_auc_std", "lira", ("auc_std",)),
            ("lira_tpr_1pct", "lira", ("tpr_at_1pct_fpr",)),
            ("online_auc", "lira_online", ("auc",)),
            ("online_auc_std", "lira_online", ("auc_std",)),
            ("online_tpr_1pct", "lira_online", ("tpr_at_1pct_fpr",)),
            ("online_tpr_01pct", "lira_online", ("tpr_at_0.1pct_fpr",))):
        row[column], n = _attack(results, block, model, *path)
        ns.append(n)
    known = [n for n in ns if n is not None]
    row["attack_n"] = min(known) if known else None
    return row


def _gap(row: dict, oracle: dict) -> float | None:
    """The mean absolute difference over the `GAP_COLUMNS` both rows have figures for."""
    pairs = [(row[c], oracle[c]) for c in GAP_COLUMNS
             if isinstance(row[c], float) and isinstance(oracle[c], float)]
    return sum(abs(a - b) for a, b in pairs) / len(pairs) if pairs else None


def report(run_dirs, out=None) -> list[dict]:
    """The comparison table of the finished runs in ``run_dirs`` (`table`: the oracle's row,
    then one per run), written to ``out`` as ``table.md``, ``table.csv`` and
    ``gap_vs_seconds.png`` when given (`write`); `markdown` prints the rows. ReportError for
    runs that cannot be compared, saying why."""
    rows = table(run_dirs)  # every check before anything is written
    if out is not None:
        write(rows, out)
    return rows


def table(run_dirs) -> list[dict]:
    """The rows: the oracle first, then one per run in the order given."""
    if not run_dirs:
        raise ReportError("give at least one run folder")
    runs = {str(d): load(d) for d in run_dirs}
    check(runs)
    with_oracle = [r for r in runs.values() if "oracle" in (r.get("test") or {})]
    if not with_oracle:
        raise ReportError("no run has an oracle to compare with; run one of them with "
                          "oracle_reference=end (or strategy=oracle)")
    source = with_oracle[0]
    oracle_seconds = (source.get("cost") or {}).get("oracle", {}).get("seconds")
    oracle = _row("oracle", True, source, "oracle", oracle_seconds)
    oracle["avg_gap"] = 0.0
    rows = [oracle]
    for results in runs.values():
        strategy = results["config"]["strategy"]
        ref = results if "oracle" in (results.get("test") or {}) else source
        cost = results.get("cost") or {}
        exact = results.get("lineage_audit", {}).get("exact", True)
        row = _row(strategy, exact, results, "ensemble", cost.get("seconds"))
        row["avg_gap"] = _gap(row, _row("oracle", True, ref, "oracle", None))
        rows.append(row)
    return rows


def _fmt(value, column: str, row: dict | None = None) -> str:
    if value == TOO_FEW:
        return f"{TOO_FEW} (n={row['attack_n']})" if row else TOO_FEW
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if column == "exact":
        return "yes" if value else "no"
    if column == "seconds":
        return f"{value:.1f}"
    if isinstance(value, float):
        text = f"{100 * value:.2f}" if column.endswith("_acc") else f"{value:.3f}"
        spread = (row or {}).get(column + "_std")
        return text + (f" ± {spread:.3f}" if isinstance(spread, float) else "")
    return str(value)


HEADERS = {"method": "method", "exact": "exact", "forget_acc": "forget acc %",
           "retain_acc": "retain acc %", "test_acc": "test acc %", "mia_auc": "MIA AUC (loss)",
           "lira_auc": "LiRA AUC", "lira_tpr_1pct": "LiRA TPR@1%FPR",
           "online_auc": "online LiRA AUC", "online_tpr_1pct": "online TPR@1%FPR",
           "online_tpr_01pct": "online TPR@0.1%FPR",
           "seconds": "unlearning s", "avg_gap": "avg gap to oracle"}


def markdown(rows: list[dict]) -> str:
    """The table in Markdown; columns no row has a figure for are left out."""
    shown = [c for c in COLUMNS
             if c in ("method", "exact") or any(r.get(c) is not None for r in rows)]
    lines = ["| " + " | ".join(HEADERS[c] for c in shown) + " |",
             "|" + "|".join("---" if c in ("method", "exact") else "---:" for c in shown) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c), c, r) for c in shown) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write(rows: list[dict], out) -> list[pathlib.Path]:
    """Writes ``table.md``, ``table.csv`` and ``gap_vs_seconds.png`` into ``out``."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(markdown(rows))
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS + DETAILS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out / "gap_vs_seconds.png")
    return [out / "table.md", out / "table.csv", out / "gap_vs_seconds.png"]


def plot(rows: list[dict], path) -> None:
    """Average gap to the oracle against unlearning seconds, one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for row in rows:
        if not isinstance(row["seconds"], (int, float)) or row["avg_gap"] is None:
            continue
        ax.scatter(row["seconds"], 100 * row["avg_gap"], s=40,
                   marker="o" if row["exact"] else "^",
                   color="tab:blue" if row["exact"] else "tab:red")
        ax.annotate(row["method"], (row["seconds"], 100 * row["avg_gap"]),
                    textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("unlearning seconds (oracle: retraining from scratch)")
    ax.set_ylabel("average gap to the oracle (points)")
    ax.set_title("exact (circles) vs approximate (triangles) unlearning")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120)
    plt.close(fig)
