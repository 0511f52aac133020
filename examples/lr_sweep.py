"""A learning-rate sweep as one stacked ensemble: every member its own learning rate, one
compiled step, one run.

    python examples/lr_sweep.py [--lrs 0.4,0.2,0.1,0.05,0.025,0.0125,0.00625,0.003125]
                                [--epochs 6] [--out DIR]

Each member of an `air-s` stack trains on the whole bundled sample (`plan=subset`,
`fraction=1`) with its own learning rate, the rest of the recipe shared; `results.json` gives
each member's settings next to its scores, printed here as the sweep's table. The same run can
then forget ids like any other: the members are still one ensemble.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil

import jaxunlearn as ju


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lrs", default="0.4,0.2,0.1,0.05,0.025,0.0125,0.00625,0.003125",
                        help="one learning rate per member, comma-separated")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out", default="runs/lr-sweep", help="the run folder (replaced)")
    args = parser.parse_args(argv)
    lrs = [float(x) for x in args.lrs.split(",")]
    out = pathlib.Path(args.out)
    shutil.rmtree(out, ignore_errors=True)

    cfg = ju.apply_overrides(ju.PRESETS["demo"], {
        "members": len(lrs), "learning_rate": lrs,  # a list: one value per member
        "plan": "subset", "fraction": 1.0, "phases": 1, "epochs": args.epochs,
        "batch_size": 50, "deletion_rate": 0.0, "baseline": "none", "evaluators": "scores"})
    results = ju.train(cfg, out, log=print)

    rows = [{"learning_rate": m["settings"]["learning_rate"],
             "test_accuracy": m["test_accuracy"]} for m in results["final"]["members"]]
    print(f"\n{'learning rate':>14}  test accuracy")
    best = max(rows, key=lambda r: r["test_accuracy"])
    for row in rows:
        mark = "  <- best" if row is best else ""
        print(f"{row['learning_rate']:>14g}  {row['test_accuracy']:.1%}{mark}")
    print(f"one stacked run of {len(lrs)} members: {results['wall_seconds']:.0f} s")
    return rows


if __name__ == "__main__":
    main()
