"""The privacy study: exact and approximate unlearning told apart by membership inference, in a
regime where members memorise (the ``privacy`` preset: 16 air-s on random halves of a
2,000-image CIFAR-10 pool).

1. Trains the preset once (``OUT/runs/trained``; a finished one is reused, a stopped one
   resumed).
2. Reads the fixed forget sets, 1% and 10% of the pool (``experiments/privacy_forget/``,
   committed; written once with ``--write-forget-sets``).
3. For each forget set and method: forks the trained run with that strategy
   (`jaxunlearn.run.fork`: the same trained bits) and forgets the set in it
   (`jaxunlearn.forgetting.forget`, as ``jaxunlearn forget --ids-file``).
4. The approximate methods' learning rate (``unlearn_lr``, a multiple of the preset's) comes
   from a small grid on the larger forget set, picked without the test set or the oracle: the
   rate whose members are as accurate on the forgotten examples they held as on the retained
   examples they never saw (``lira_online``'s ``pair_accuracy``), among those that keep the
   retained sample's accuracy within 5 points of before. The smaller set uses the rate picked.
5. Writes, per forget set, ``OUT/forget-SET/`` (`jaxunlearn.comparison`: ``table.md``, ``table.csv``
   and a plot, with a row for the model before unlearning), ``OUT/grid.md`` and
   ``OUT/summary.json`` (the trained model's train/test gap, the rates picked, each cell's wall
   seconds).

    python experiments/privacy.py --data PATH/cifar-10-batches-bin --out experiments/results/privacy
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

from jaxunlearn import records

HERE = pathlib.Path(__file__).resolve().parent
FORGET_DIR = HERE / "privacy_forget"
FORGET_SETS = {"1pct": 0.01, "10pct": 0.10}
EXACT = ("oracle", "rewind", "replace")
APPROXIMATE = ("finetune", "neggrad", "random_labels", "salun", "scrub")
GRID = (0.03, 0.1, 0.3)  # unlearn_lr: multiples of the preset's learning rate
RETAIN_DROP = 0.05  # the most retained-sample accuracy a picked rate may lose


def forget_path(name: str, folder: pathlib.Path = FORGET_DIR) -> pathlib.Path:
    return folder / f"forget-{name}.txt"


def write_forget_sets(pool: int, seed: int = 0, folder: pathlib.Path = FORGET_DIR) -> None:
    """The fixed forget sets: ``fraction`` of the pool's ids each, drawn once."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, fraction in FORGET_SETS.items():
        ids = np.sort(rng.choice(pool, int(round(fraction * pool)), replace=False))
        forget_path(name, folder).write_text("\n".join(map(str, ids)) + "\n")


def read_forget_set(name: str, folder: pathlib.Path = FORGET_DIR) -> list[int]:
    from jaxunlearn import forgetting

    path = forget_path(name, folder)
    if not path.is_file():
        raise SystemExit(f"{path} is missing; write the forget sets once with "
                         f"--write-forget-sets (and commit them)")
    return forgetting.parse_ids(path=path)


def finished(run_dir: pathlib.Path) -> dict | None:
    """A cell's results when it has applied its forget request and finished, else None."""
    path = run_dir / "results.json"
    if not path.is_file():
        return None
    results = records.load(path)
    return results if results.get("complete") and results.get("requests") else None


def run_cell(base: pathlib.Path, cell: pathlib.Path, overrides: list[str], ids: list[int],
             dataset, log) -> dict:
    """Forks ``base`` into ``cell`` with ``overrides`` and forgets ``ids`` there."""
    import shutil

    from jaxunlearn import forgetting
    from jaxunlearn.driver import fork

    done = finished(cell)
    if done is not None:
        return done
    shutil.rmtree(cell, ignore_errors=True)  # an unfinished cell starts again
    t0 = time.perf_counter()
    fork(base, cell, overrides, dataset=dataset, log=log)
    forked = time.perf_counter() - t0
    outcome = forgetting.forget(cell, ids, log=log, dataset=dataset)
    results = outcome["results"]
    results["study"] = {"overrides": overrides, "fork_seconds": forked,
                        "wall_seconds": time.perf_counter() - t0}
    (cell / "results.json").write_text(json.dumps(results, indent=1))
    return results


def pair_gap(results: dict) -> tuple[float, float]:
    """(|forgotten - unseen| pair accuracy, retained-sample accuracy drop) after unlearning."""
    block = results["lira_online"]
    pairs = block["ensemble"]["pair_accuracy"]
    before = results["requests"][-1]["retain"]["ensemble_before"]["accuracy"]
    after = results["retain"]["ensemble"]["accuracy"]
    return abs(pairs["forgotten"] - pairs["unseen"]), before - after


def pick(cells: dict[float, dict]) -> float:
    """The grid's rate: the smallest pair-accuracy gap among rates that keep the retained
    accuracy within `RETAIN_DROP` (the smallest drop when none does)."""
    scored = {lr: pair_gap(r) for lr, r in cells.items()}
    kept = [lr for lr, (_, drop) in scored.items() if drop <= RETAIN_DROP]
    if kept:
        return min(kept, key=lambda lr: scored[lr][0])
    return min(scored, key=lambda lr: scored[lr][1])


def before_row(results: dict) -> dict:
    """A table row for the trained model before unlearning (the request's ``ensemble_before``
    blocks)."""
    from jaxunlearn import comparison

    request = results["requests"][-1]
    row = comparison._row("before unlearning", None, request, "ensemble_before", None)
    row["avg_gap"] = None
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="CIFAR-10 (see `jaxunlearn data`); default: the preset's")
    parser.add_argument("--out", default="experiments/results/privacy")
    parser.add_argument("--methods", nargs="+", help="default: every exact and approximate "
                                                     "method registered")
    parser.add_argument("--sets", nargs="+", default=list(FORGET_SETS), choices=FORGET_SETS)
    parser.add_argument("--grid", nargs="+", type=float, default=list(GRID),
                        help="unlearn_lr grid of the approximate methods")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a setting of the preset")
    parser.add_argument("--forget-dir", type=pathlib.Path, default=FORGET_DIR,
                        help="where the forget sets are (default: the committed ones)")
    parser.add_argument("--write-forget-sets", action="store_true",
                        help="draw the fixed forget sets (once) into --forget-dir and stop")
    args = parser.parse_args(argv)

    from jaxunlearn import cache, data as data_lib, driver, strategies, comparison
    from jaxunlearn.config import apply_overrides, get_preset

    cfg = get_preset("privacy")
    cfg = apply_overrides(cfg, ([f"data={args.data}"] if args.data else []) + args.overrides)
    if args.write_forget_sets:
        write_forget_sets(cfg.train_limit, cfg.seed, args.forget_dir)
        print(f"wrote {', '.join(str(forget_path(n, args.forget_dir)) for n in FORGET_SETS)}")
        return 0
    cache.use_compilation_cache()
    methods = args.methods or [m for m in EXACT + APPROXIMATE if m in strategies.NAMES]
    out = pathlib.Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(line, flush=True)

    dataset = data_lib.load_dataset(cfg.data)
    base = out / "runs" / "trained"
    t0 = time.perf_counter()
    if (base / "config.json").is_file():
        trained = driver.resume(base, dataset=dataset, log=log, progress=False)
    else:
        trained = driver.train_and_evaluate(cfg, base, dataset=dataset, log=log,
                                            progress=False)
    summary = {"command": "python " + " ".join([sys.argv[0]] + sys.argv[1:]),
               "config": trained["config"], "train_seconds": trained["wall_seconds"],
               "test_accuracy": trained["final"]["ensemble"]["test_accuracy"],
               "member_test_accuracy": float(np.mean([m["test_accuracy"]
                                                      for m in trained["final"]["members"]])),
               "grid": {}, "picked": {}, "cells": {}}
    log(f"trained in {trained['wall_seconds']:.0f}s (this call {time.perf_counter() - t0:.0f}s)")

    # The larger set first: its grid picks the approximate methods' rates.
    order = sorted(args.sets, key=lambda s: -FORGET_SETS[s])
    grid_lines = ["| method | unlearn_lr | forgotten acc % | unseen acc % | retain drop (points) "
                  "| picked |", "|---|---:|---:|---:|---:|---|"]
    for name in order:
        ids = read_forget_set(name, args.forget_dir)
        chosen: dict[str, pathlib.Path] = {}
        for method in methods:
            approximate = not strategies.make(method).exact
            rates = (args.grid if approximate and name == order[0] else
                     [summary["picked"].get(method, cfg.unlearn_lr)] if approximate else [None])
            cells = {}
            for lr in rates:
                label = f"{name}-{method}" + (f"-lr{lr:g}" if lr is not None else "")
                overrides = [f"strategy={method}"] + ([f"unlearn_lr={lr}"] if lr else [])
                log(f"== {label}")
                results = run_cell(base, out / "runs" / label, overrides, ids, dataset, log)
                cells[lr] = results
                summary["cells"][label] = {
                    "wall_seconds": results["study"]["wall_seconds"],
                    "unlearning_seconds": results["cost"]["seconds"],
                    "test_accuracy": results["final"]["ensemble"]["test_accuracy"]}
            lr = pick(cells) if len(cells) > 1 else rates[0]
            if len(cells) > 1:
                summary["picked"][method] = lr
                for rate, results in cells.items():
                    gap, drop = pair_gap(results)
                    pairs = results["lira_online"]["ensemble"]["pair_accuracy"]
                    grid_lines.append(
                        f"| {method} | {rate:g} | {100 * pairs['forgotten']:.2f} | "
                        f"{100 * pairs['unseen']:.2f} | {100 * drop:.2f} | "
                        f"{'yes' if rate == lr else ''} |")
                summary["grid"][method] = {f"{r:g}": dict(zip(("pair_gap", "retain_drop"),
                                                              pair_gap(c)))
                                           for r, c in cells.items()}
            label = f"{name}-{method}" + (f"-lr{lr:g}" if lr is not None else "")
            chosen[method] = out / "runs" / label
        rows = comparison.table(list(chosen.values()))
        rows = rows[:1] + [r for r in rows[1:] if r["method"] != "oracle"]  # one oracle row
        first = finished(next(iter(chosen.values())))
        rows.insert(1, before_row(first))
        pairs = first["requests"][-1]["lira_online"]["ensemble_before"].get("pair_accuracy", {})
        summary[f"forget-{name}"] = {"ids": len(ids), "before_pair_accuracy": pairs}
        comparison.write(rows, out / f"forget-{name}")
        log(f"forget set {name} ({len(ids)} ids):\n{comparison.markdown(rows)}")
    (out / "grid.md").write_text("\n".join(grid_lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log(f"wrote {out}/forget-*/table.md, grid.md, summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
