"""Sweep: the unlearning trade-off over members M, sample fraction, plan and strategy.

Runs one `jaxunlearn` experiment per grid cell (in this process, so compilations are shared),
then writes into ``--out``:

* ``table.csv`` and ``table.md``: one row per cell: final test accuracy of the ensemble and of
  the oracle, forget/retain accuracy, the membership-inference AUC before unlearning, after it
  and for the oracle, members invalidated (observed and expected), and the unlearning cost
  (member-epochs, member-examples, seconds) with its speed-up over the oracle in member-examples
  and in seconds (the oracle's: the run's own training of the stages it would retrain);
* ``plots/frontier.png``: final test accuracy against unlearning cost, the trade-off frontier;
* ``plots/phases.png``: per-phase test accuracy and loss of each strategy (first grid setting);
* ``plots/mia.png``: membership-inference AUC before and after unlearning, and the oracle's;
* ``runs/CELL/``: each cell's run folder (``results.json`` etc.).

Grids:

* ``cpu``: tiny ResNets (ImageNet stem) on the bundled 1,000-image sample, 5 phases, deletions of 1% of the
  arrived data after phases 1-4. Minutes on two CPU cores.
* ``gpu``: ResNet-18 ensembles on full CIFAR-10 (``--data``), the original protocol's phases,
  epochs and deletions. Hours on one GPU; pass ``--only`` to run part of it.

Examples::

    python experiments/sweep.py --grid cpu --out sweeps/cpu
    python experiments/sweep.py --grid gpu --data PATH/cifar-10-batches-bin --out sweeps/gpu
    python experiments/sweep.py --grid cpu --list          # print the cells, run nothing
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import pathlib
import sys
import time

from jaxunlearn import records

EXACT = ("replace", "rewind", "oracle")


@dataclasses.dataclass(frozen=True)
class Grid:
    base: dict  # overrides of the preset shared by every cell
    preset: str
    members: tuple[int, ...]
    fractions: tuple[float, ...]
    plans: tuple[str, ...]
    strategies: tuple[str, ...] | None = None  # None: every registered strategy
    deletion_rates: tuple[float, ...] = ()  # forget-set sizes (empty: the base's)
    oracle_in: str | None = None  # only this strategy's cells train the oracle reference


GRIDS = {
    "cpu": Grid(preset="smoke", members=(3, 6), fractions=(0.2, 0.5),
                plans=("bootstrap", "subset", "shards"), strategies=EXACT,
                base=dict(train_limit=1000, test_limit=300, phases=5, epochs=3, batch_size=32,
                          eval_batch_size=500, deletion_rate=0.01, retain_eval=500,
                          baseline="none", oracle_reference="end", eval_every_epoch=False)),
    "gpu": Grid(preset="seed", members=(5, 10, 20), fractions=(0.2, 0.5),
                plans=("bootstrap", "subset", "shards"), strategies=EXACT,
                base=dict(baseline="none", oracle_reference="end", eval_every_epoch=False)),
    # Exact against approximate unlearning at two forget-set sizes, the field's table per size
    # (`jaxunlearn.comparison`): 5 air-s on half-samples (each example in about half the members,
    # so LiRA has models on both sides), 2,000 CIFAR-10 training images in 2 phases, 1% or 20%
    # of the first phase's images forgotten. The oracle comes from the rewind cells.
    "methods": Grid(preset="protocol", members=(5,), fractions=(0.5,), plans=("subset",),
                    strategies=("replace", "rewind", "finetune", "neggrad", "random_labels"),
                    deletion_rates=(0.01, 0.2), oracle_in="rewind",
                    base=dict(train_limit=2000, test_limit=1000, phases=2, epochs=5,
                              batch_size=64, eval_batch_size=500, retain_eval=1000,
                              baseline="none", oracle_reference="none",
                              evaluators="scores,mia,lira")),
}

COLUMNS = ("cell", "plan", "members", "fraction", "strategy", "test_acc", "oracle_test_acc",
           "forget_acc", "retain_acc", "mia_auc_before", "mia_auc_after", "mia_auc_oracle",
           "deleted", "invalidated", "invalidated_expected", "unlearn_member_epochs",
           "unlearn_member_examples", "unlearn_seconds", "oracle_member_examples",
           "oracle_seconds", "speedup_vs_oracle", "speedup_vs_oracle_seconds", "wall_seconds")


def cells(grid: Grid) -> list[dict]:
    """The grid's cells as override dicts (``shards`` uses each member's whole shard, so it
    has one fraction, 1)."""
    from jaxunlearn import strategies

    out = []
    for plan, members, fraction, strategy, rate in itertools.product(
            grid.plans, grid.members, grid.fractions, grid.strategies or strategies.NAMES,
            grid.deletion_rates or (None,)):
        if plan == "shards":
            if fraction != grid.fractions[0]:
                continue
            fraction = 1.0
        cell = dict(grid.base, plan=plan, members=members, fraction=fraction,
                    strategy=strategy)
        if rate is not None:
            cell["deletion_rate"] = rate
        if grid.oracle_in == strategy:
            cell["oracle_reference"] = "end"
        out.append(cell)
    return out


def cell_name(c: dict) -> str:
    name = f"{c['plan']}-m{c['members']}-f{c['fraction']:g}-{c['strategy']}"
    return name + (f"-d{c['deletion_rate']:g}" if "deletion_rate" in c else "")


def write_method_tables(grid: Grid, done: dict[str, pathlib.Path], out: pathlib.Path) -> None:
    """The field's table (`jaxunlearn.comparison`) for each forget-set size of the grid, from its
    finished cells: ``methods-dRATE/table.md``, ``table.csv`` and ``gap_vs_seconds.png``."""
    from jaxunlearn import comparison

    for rate in grid.deletion_rates:
        dirs = [d for name, d in done.items() if name.endswith(f"-d{rate:g}")]
        try:
            rows = comparison.table(dirs)
        except comparison.ReportError as e:
            print(f"no table for deletion_rate {rate:g}: {e}", file=sys.stderr)
            continue
        comparison.write(rows, out / f"methods-d{rate:g}")
        print(f"deletion_rate {rate:g}:\n{comparison.markdown(rows)}", end="", flush=True)


def row(name: str, c: dict, results: dict) -> dict:
    """One table row from a cell's ``results.json``."""
    def get(block, model, key="accuracy"):
        value = results.get(block, {}).get(model)
        return None if value is None else value.get(key)

    def auc(entry):
        return None if entry is None or "logistic" not in entry else entry["logistic"]["auc"]

    mia = results.get("mia", {})
    cost = results["cost"]
    return {
        "cell": name, "plan": c["plan"], "members": c["members"], "fraction": c["fraction"],
        "strategy": c["strategy"],
        "test_acc": results["final"]["ensemble"]["test_accuracy"],
        "oracle_test_acc": get("test", "oracle"),
        "forget_acc": get("forget", "ensemble"), "retain_acc": get("retain", "ensemble"),
        "mia_auc_before": auc(mia.get("ensemble_before_last_deletion")),
        "mia_auc_after": auc(mia.get("ensemble")), "mia_auc_oracle": auc(mia.get("oracle")),
        "deleted": len(results["deleted_ids"]),
        "invalidated": cost["invalidated_observed"],
        "invalidated_expected": cost["invalidated_expected"],
        "unlearn_member_epochs": cost["member_epochs"],
        "unlearn_member_examples": cost["member_examples"],
        "unlearn_seconds": cost["seconds"],
        "oracle_member_examples": cost["oracle"]["member_examples"],
        "oracle_seconds": cost["oracle"]["seconds"],
        "speedup_vs_oracle": cost["speedup_vs_oracle"],
        "speedup_vs_oracle_seconds": cost["speedup_vs_oracle_seconds"],
        "wall_seconds": results["wall_seconds"],
    }


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def write_tables(rows: list[dict], out: pathlib.Path) -> None:
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    shown = [c for c in COLUMNS if c not in ("cell", "oracle_member_examples")]
    lines = ["| " + " | ".join(shown) + " |", "|" + " --- |" * len(shown)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in shown) + " |" for r in rows]
    (out / "table.md").write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], runs: pathlib.Path, out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "plots").mkdir(exist_ok=True)
    names = list(dict.fromkeys(r["strategy"] for r in rows))
    markers = dict(zip(names, "os^Dv<>phX*"))
    colors = {"bootstrap": "tab:blue", "subset": "tab:green", "shards": "tab:red"}

    # Frontier: accuracy against what unlearning cost (member-examples retrained; replace
    # retrains nothing at once, drawn at 1 on the log axis).
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for r in rows:
        x = max(r["unlearn_member_examples"], 1)
        ax.scatter(x, r["test_acc"], marker=markers[r["strategy"]], color=colors[r["plan"]],
                   s=18 + 6 * r["members"], alpha=0.8, edgecolor="k", linewidth=0.4)
    ax.set_xscale("log")
    ax.set_xlabel("unlearning cost: member-examples retrained over all deletions (log)")
    ax.set_ylabel("final ensemble test accuracy")
    handles = [plt.Line2D([], [], marker=m, ls="", color="grey", label=s)
               for s, m in markers.items()]
    handles += [plt.Line2D([], [], marker="o", ls="", color=c, label=p)
                for p, c in colors.items()]
    ax.legend(handles=handles, fontsize=8, loc="best", title="size: members", title_fontsize=7)
    ax.grid(alpha=0.3)
    ax.set_title("accuracy vs unlearning cost", fontsize=10)
    fig.savefig(out / "plots" / "frontier.png", dpi=110)
    plt.close(fig)

    # Per-phase accuracy and loss of each strategy, for the first setting of the grid.
    first = rows[0]
    same = [r for r in rows if (r["plan"], r["members"], r["fraction"])
            == (first["plan"], first["members"], first["fraction"])]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for r in same:
        results = records.load(runs / r["cell"] / "results.json")
        phases = [p["phase"] for p in results["phases"]]
        for ax, key in zip(axes, ("test_accuracy", "test_loss")):
            after = [p.get("after_unlearning", {}).get("ensemble", p["ensemble"])[key]
                     for p in results["phases"]]
            ax.plot(phases, after, marker=markers[r["strategy"]], label=r["strategy"])
    for ax, label in zip(axes, ("test accuracy after unlearning", "test loss after unlearning")):
        ax.set_xlabel("phase")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{first['plan']}, {first['members']} members, fraction {first['fraction']:g}",
                 fontsize=10)
    fig.savefig(out / "plots" / "phases.png", dpi=110)
    plt.close(fig)

    # Membership inference before/after unlearning and the oracle's, per cell.
    fig, ax = plt.subplots(figsize=(max(7, 0.35 * len(rows)), 4.5), constrained_layout=True)
    xs = range(len(rows))
    for offset, key, label in ((-0.25, "mia_auc_before", "before"),
                               (0.0, "mia_auc_after", "after"),
                               (0.25, "mia_auc_oracle", "oracle")):
        ax.bar([x + offset for x in xs], [r[key] if r[key] is not None else 0 for r in rows],
               width=0.25, label=label)
    ax.axhline(0.5, color="k", lw=0.8, ls="--")
    ax.set_xticks(list(xs), [r["cell"] for r in rows], rotation=75, fontsize=6)
    ax.set_ylabel("membership-inference AUC (forget vs test)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.savefig(out / "plots" / "mia.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", choices=sorted(GRIDS), default="cpu")
    parser.add_argument("--out", default="sweeps/cpu", help="output folder (reused: finished "
                                                             "cells are not run again)")
    parser.add_argument("--data", help="dataset for every cell (see `jaxunlearn data`)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", action="append", default=[], metavar="TEXT",
                        help="run only cells whose name contains TEXT (may repeat)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting in every cell (e.g. epochs=1)")
    parser.add_argument("--list", action="store_true", help="print the cells and exit")
    args = parser.parse_args(argv)

    from jaxunlearn import config as config_lib
    from jaxunlearn import data as data_lib
    from jaxunlearn import driver

    grid = GRIDS[args.grid]
    chosen = [c for c in cells(grid)
              if not args.only or any(t in cell_name(c) for t in args.only)]
    if args.list:
        print("\n".join(cell_name(c) for c in chosen))
        return 0
    out = pathlib.Path(args.out)
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    base = config_lib.get_preset(grid.preset)
    if args.data:
        base = config_lib.apply_overrides(base, {"data": args.data})
    base = config_lib.apply_overrides(base, {"seed": args.seed})
    try:
        configs = [config_lib.apply_overrides(config_lib.apply_overrides(base, c), args.sets)
                   for c in chosen]
        dataset = data_lib.load_dataset(base.data)
    except (config_lib.ConfigError, data_lib.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows, finished = [], {}
    for c, cfg in zip(chosen, configs):
        name = cell_name(c)
        run_dir = runs / name
        results_path = run_dir / "results.json"
        done = results_path.exists() and records.load(results_path).get("complete")
        if not done:
            if run_dir.exists():  # an unfinished cell from an interrupted sweep: run it again
                import shutil

                shutil.rmtree(run_dir)
            t0 = time.perf_counter()
            driver.train_and_evaluate(cfg, run_dir, dataset=dataset, log=lambda s: None,
                                      progress=False)
            print(f"{name}: {time.perf_counter() - t0:.1f}s", flush=True)
        rows.append(row(name, c, records.load(results_path)))
        finished[name] = run_dir
        write_tables(rows, out)
    plot(rows, runs, out)
    if grid.deletion_rates:
        write_method_tables(grid, finished, out)
    print(f"wrote {out / 'table.md'}, {out / 'table.csv'} and {out / 'plots'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
