"""The trade-off on full CIFAR-10: test accuracy against the cost of each single-id deletion
request, from one `air-s` on all the data to SISA ensembles.

For each configuration (``CONFIGS``: the air recipe, one phase with all the data present,
``strategy=rewind``, nothing deleted by schedule):

1. trains it once into ``RUNS/NAME`` (default ``runs/frontier``; a finished run is reused, a
   stopped one resumed);
2. serves the same stream of single-id requests on a copy (``benchmarks/deletion_serving.py``:
   each a whole `forget`, served in one process) and records per request the wall seconds and
   where they went, the member-examples retrained, the audit;
3. writes ``OUT/NAME.json`` (the run's accuracy and training seconds, the serving summary and
   every request), then ``OUT/frontier.md`` (the table) and ``OUT/frontier.png`` (accuracy
   against median seconds per request, log x; the single model's retraining marked).

    python experiments/frontier.py --data PATH/cifar-10-batches-bin --out experiments/results/frontier

``--only NAME ...`` runs some configurations; ``--requests N`` (default 3) sets the stream (the
single model gets one: each of its requests retrains all of it).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

from jaxunlearn import records

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent

BASE = {"data": "cifar10", "phases": 1, "deletion_rate": 0.0, "strategy": "rewind",
        "oracle_reference": "none", "baseline": "none", "eval_every_epoch": False,
        "keep_checkpoints": 1, "evaluators": "scores"}
def _pretrained(never_deletable: int, pretrain_epochs: int, epochs: int = 3,
                learning_rate: float = 0.1) -> dict:
    """10 air-s on shards in 4 slices at batch 64, fine-tuned (``epochs`` per stage at
    ``learning_rate``) from one air-s pretrained at the single model's recipe (batch 256,
    learning rate 0.8) on the last ``never_deletable`` images."""
    return {"pretrain": never_deletable, "pretrain_epochs": pretrain_epochs,
            "pretrain_batch_size": 256, "pretrain_lr": 0.8, "members": 10, "plan": "shards",
            "slices": 4, "epochs": epochs, "batch_size": 64, "learning_rate": learning_rate}


# name -> (overrides of the air-s-single preset, what it is). Members on smaller shards take
# smaller batches (learning rate scaled with the batch) so each still takes hundreds of steps;
# with slices S a stage trains on slices 1..s, so a member passes over its shard
# epochs x (S + 1) / 2 times in all.
CONFIGS = {
    "sisa-5": ({"members": 5, "plan": "shards", "slices": 1, "epochs": 8, "batch_size": 128,
                "learning_rate": 0.4},
               "5 air-s on disjoint shards of 10,000, 8 epochs at batch 128"),
    "sisa-5x4": ({"members": 5, "plan": "shards", "slices": 4, "epochs": 3, "batch_size": 128,
                  "learning_rate": 0.4},
                 "5 air-s on shards of 10,000 in 4 slices, 3 epochs per stage (7.5 passes)"),
    "sisa-10": ({"members": 10, "plan": "shards", "slices": 1, "epochs": 10, "batch_size": 64,
                 "learning_rate": 0.2},
                "10 air-s on shards of 5,000, 10 epochs at batch 64 (no slices)"),
    "sisa-10x4": ({"members": 10, "plan": "shards", "slices": 4, "epochs": 4, "batch_size": 64,
                   "learning_rate": 0.2},
                  "10 air-s on shards of 5,000 in 4 slices, 4 epochs per stage (10 passes) at "
                  "batch 64"),
    "single": ({}, "one air-s on all 50,000 images, 5 epochs at batch 256 (a request retrains "
                   "it)"),
    "sisa-20": ({"members": 20, "plan": "shards", "slices": 1, "epochs": 12, "batch_size": 32,
                 "learning_rate": 0.1},
                "20 air-s on shards of 2,500, 12 epochs at batch 32 (no slices)"),
    "sisa-20x4": ({"members": 20, "plan": "shards", "slices": 4, "epochs": 5, "batch_size": 32,
                   "learning_rate": 0.1},
                  "20 air-s on shards of 2,500 in 4 slices, 5 epochs per stage (12.5 passes) "
                  "at batch 32"),
    # A pretrained initialisation: the last N images (declared never deletable) train one
    # air-s at the single model's recipe once; each member then fine-tunes from it on its
    # shard of the other images, at half the learning rate per image of a member from scratch.
    # A request retrains one member from that start; never the pretraining.
    "pre10k-sisa10x4": (_pretrained(10000, pretrain_epochs=15),
                        "10,000 images never deletable pretrain one air-s (15 epochs); 10 "
                        "members fine-tune from it on shards of 4,000 in 4 slices, 3 epochs "
                        "per stage"),
    "pre25k-sisa10x4": (_pretrained(25000, pretrain_epochs=8),
                        "25,000 images never deletable pretrain one air-s (8 epochs); 10 "
                        "members fine-tune from it on shards of 2,500 in 4 slices, 3 epochs "
                        "per stage"),
    # The same pretraining, members fine-tuned gently: a fifth of the learning rate, 2 epochs
    # per stage (5 passes over the shard).
    "pre25k-sisa10x4-ft": (_pretrained(25000, pretrain_epochs=8, epochs=2, learning_rate=0.02),
                           "as pre25k-sisa10x4, members fine-tuned at learning rate 0.02 "
                           "(a tenth of a member's from scratch), 2 epochs per stage"),
}


# Every request on the single model retrains all of it: one request shows its cost.
REQUESTS = {"single": 1}


def train(name: str, runs: pathlib.Path, data: str | None) -> pathlib.Path:
    from jaxunlearn import cache, driver
    from jaxunlearn.config import apply_overrides, get_preset

    cache.use_compilation_cache()
    run = runs / name
    results = run / "results.json"
    if results.exists() and records.load(results).get("complete"):
        return run
    overrides = {**BASE, **CONFIGS[name][0], **({"data": data} if data else {})}
    cfg = apply_overrides(get_preset("air-s-single"), overrides)
    if (run / "config.json").exists():
        driver.resume(run, log=print, progress=False)
    else:
        driver.train_and_evaluate(cfg, run, log=print, progress=False)
    return run


def serve(name: str, run: pathlib.Path, out: pathlib.Path, requests: int,
          data: str | None) -> dict:
    path = out / f"{name}.serving.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "deletion_serving.py"), str(run),
               "--requests", str(requests), "--seed", "0", "--out", str(path)]
    if data:
        command += ["--data", data]
    subprocess.run(command, check=True)
    return json.loads(path.read_text())


def summary(name: str, run: pathlib.Path, serving: dict) -> dict:
    results = records.load(run / "results.json")
    s = serving["summary"]
    return {"name": name, "what": CONFIGS[name][1], "members": results["config"]["members"],
            "slices": results["config"]["slices"], "epochs": results["config"]["epochs"],
            "test_accuracy": results["final"]["ensemble"]["test_accuracy"],
            "never_deletable": results["config"].get("pretrain", 0),
            "pretrained_accuracy": results.get("pretrain", {}).get("test_accuracy"),
            "training_seconds": s["training_from_scratch_s"],
            "wall_seconds": results["wall_seconds"],
            "request_median_s": s["wall"]["median"], "request_p90_s": s["wall"]["p90"],
            "overhead_median_s": s["overhead"]["median"],
            "member_examples_median": s["member_examples"]["median"],
            "audit_ok": s["audit_ok"], "requests": len(serving["rows"])}


def table(rows: list[dict], single: dict | None) -> str:
    ref = single["training_seconds"] if single else None
    lines = ["| configuration | never deletable | test acc (flip TTA) | training s | "
             "request median s (p90) | overhead median s | member-examples per request | "
             "vs retraining one air-s | audit |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        ratio = f"{r['request_median_s'] / ref:.2f}x" if ref else "n/a"
        lines.append(f"| `{r['name']}`: {r['what']} | {r.get('never_deletable', 0):,} | "
                     f"{100 * r['test_accuracy']:.2f}% | "
                     f"{r['training_seconds']:.0f} | {r['request_median_s']:.1f} "
                     f"({r['request_p90_s']:.1f}) | {r['overhead_median_s']:.1f} | "
                     f"{r['member_examples_median']:,.0f} | {ratio} | "
                     f"{'clean' if r['audit_ok'] else 'FAILED'} ({r['requests']} requests) |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], single: dict | None, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in rows:
        ax.scatter(r["request_median_s"], 100 * r["test_accuracy"], s=30)
        ax.annotate(r["name"], (r["request_median_s"], 100 * r["test_accuracy"]),
                    textcoords="offset points", xytext=(5, 4), fontsize=8)
    if single:
        ax.axvline(single["training_seconds"], color="grey", ls="--", lw=1)
        ax.text(single["training_seconds"], ax.get_ylim()[0], " retraining one air-s",
                rotation=90, va="bottom", fontsize=8, color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("median seconds per single-id request (log)")
    ax.set_ylabel("test accuracy, % (flip TTA)")
    ax.set_title("Full CIFAR-10 on 2 CPU cores: accuracy vs deletion cost")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="CIFAR-10 (default: the config's auto search)")
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "results" / "frontier")
    parser.add_argument("--runs", type=pathlib.Path, default=ROOT / "runs" / "frontier",
                        help="where the trained runs go (not committed)")
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS))
    parser.add_argument("--requests", type=int, default=3)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only or list(CONFIGS):
        print(f"== {name}: {CONFIGS[name][1]}", flush=True)
        run = train(name, args.runs, args.data)
        serving = serve(name, run, args.out, REQUESTS.get(name, args.requests), args.data)
        (args.out / f"{name}.json").write_text(
            json.dumps(summary(name, run, serving), indent=2) + "\n")
    rows = [json.loads((args.out / f"{n}.json").read_text()) for n in CONFIGS
            if (args.out / f"{n}.json").exists()]
    single = next((r for r in rows if r["name"] == "single"), None)
    (args.out / "frontier.md").write_text(table(rows, single))
    plot(rows, single, args.out / "frontier.png")
    print(table(rows, single))
    return 0


if __name__ == "__main__":
    sys.exit(main())
