"""Seconds from a deletion request to a restored ensemble, per member-parallel strategy.

Two parts, on a freshly initialised stacked ensemble (the cost does not depend on the weights):

1. ``unlearn_s``: the experiment's jitted `unlearn(key, state, invalid)` (from
   `jaxunlearn.group.compile_group`, state donated) with a random invalid mask (at least one
   member), median over ``--repeats`` calls after a warm-up call, each waited for with
   ``block_until_ready``. It reinitialises the invalid members in place.
2. ``retrain_s``: the ``replace`` strategy retrains each invalid member on ``--samples``
   examples for ``--epochs`` epochs, through the experiment's trainer: the invalid members
   train as sub-stacks of their own (`retrain_cost.py` times every k), median of ``--steps``
   timed retrainings after one that compiles. ``step_s_median`` is the whole ensemble's step,
   for comparison. ``total_s = unlearn_s + retrain_s``.

    python benchmarks/unlearn_latency.py --model resnet18 --stem imagenet --members 5 \
        --strategies vmap map --batch 32 --samples 512 --epochs 2 --steps 3 \
        --out benchmarks/results/cpu_unlearn_latency.json

Prints a table; ``--out`` writes JSON with the command, date, device, versions and rows.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import benchlib
import retrain_cost
from jaxunlearn.group import compile_group

LEARNING_RATE = 1e-3


def random_invalid(rng: np.random.Generator, members: int) -> np.ndarray:
    """A random bool mask ``[members]`` with at least one true entry."""
    mask = rng.random(members) < 0.5
    mask[rng.integers(members)] = True
    return mask


def measure(model: str, stem: str, precision: str, members: int, strategy: str, batch: int,
            samples: int, epochs: int, steps: int, repeats: int, augment: bool,
            n_data: int) -> dict:
    fns = compile_group(model, stem, precision, "adam", LEARNING_RATE, 0.0, strategy, augment)
    rng = np.random.default_rng(0)
    invalid = jnp.asarray(random_invalid(rng, members))
    state = fns.init(jax.random.PRNGKey(0), members)

    key = jax.random.PRNGKey(1)
    unlearn, unlearn_compile_s, _ = benchlib.compile_timed(fns.unlearn, key, state, invalid)

    def call_unlearn(s):
        s = unlearn(key, s, invalid)
        return s, s

    state, unlearn_first_s, unlearn_times = benchlib.time_calls(
        call_unlearn, state, repeats, jax.block_until_ready)

    images = jnp.asarray(rng.integers(0, 256, (n_data, 32, 32, 3), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, 10, n_data), jnp.int32)
    idx = jnp.asarray(rng.integers(0, n_data, (members, batch)), jnp.int32)
    weight = jnp.ones((members, batch), jnp.float32)
    args = (images, labels, idx, weight, invalid)
    step, step_compile_s, _ = benchlib.compile_timed(fns.step, state, *args)
    _, _, step_times = benchlib.time_calls(lambda s: step(s, *args), state, steps,
                                           jax.block_until_ready)

    unlearn_s = statistics.median(unlearn_times)
    step_s = statistics.median(step_times)
    steps_per_epoch = math.ceil(samples / batch)
    group, trainer, stage = retrain_cost.setup(model, stem, strategy, "auto", members, batch,
                                               samples, epochs, precision, augment)
    _, _, retrain_times = retrain_cost.time_training(group, trainer, stage,
                                                     np.asarray(invalid), steps)
    retrain_s = statistics.median(retrain_times)
    return {"invalid_members": int(np.asarray(invalid).sum()),
            "unlearn_compile_s": unlearn_compile_s, "unlearn_first_s": unlearn_first_s,
            "unlearn_s": unlearn_s, "unlearn_s_min": min(unlearn_times),
            "unlearn_s_max": max(unlearn_times), "step_compile_s": step_compile_s,
            "step_s_median": step_s, "step_s_min": min(step_times),
            "step_s_max": max(step_times), "steps_per_epoch": steps_per_epoch,
            "retrain_s": retrain_s, "total_s": unlearn_s + retrain_s}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--stem", default="imagenet", choices=("imagenet", "cifar"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--members", type=int, default=5)
    p.add_argument("--strategies", nargs="+", default=["vmap", "map"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--samples", type=int, default=512, help="examples each retrained member sees")
    p.add_argument("--epochs", type=int, default=2, help="retraining epochs")
    p.add_argument("--steps", type=int, default=3, help="timed ensemble steps")
    p.add_argument("--repeats", type=int, default=5, help="timed unlearn calls")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--n-data", type=int, default=50_000, help="resident synthetic images")
    p.add_argument("--out", help="JSON file to write")
    args = p.parse_args(argv)

    record = {"command": benchlib.command_line("unlearn_latency.py", argv),
              "date": benchlib.utc_now(), "device": None, "versions": benchlib.versions(),
              "formula": "retrain_s: the invalid members retrained for `epochs` on `samples` "
                         "each (measured, sub-stacks); total_s = unlearn_s + retrain_s",
              "rows": []}
    rows = record["rows"]
    for strategy in args.strategies:
        row = {"model": args.model, "stem": args.stem, "precision": args.precision,
               "members": args.members, "strategy": strategy, "batch": args.batch,
               "samples": args.samples, "epochs": args.epochs, "augment": args.augment,
               "steps": args.steps, "repeats": args.repeats}
        t0 = time.perf_counter()
        try:
            row.update(measure(args.model, args.stem, args.precision, args.members, strategy,
                               args.batch, args.samples, args.epochs, args.steps, args.repeats,
                               args.augment, args.n_data), status="ok")
        except Exception as exc:  # OOM or other failure: record it and go on
            row["status"] = benchlib.failure_status(exc)
        rows.append(row)
        print(f"[{strategy} {time.perf_counter() - t0:.0f}s] {row['status']}", file=sys.stderr,
              flush=True)
        record["device"] = benchlib.jax_device()
        if args.out:  # after every row, so a run cut off by a time limit keeps what it measured
            benchlib.write_record(args.out, record)

    print(f"# {args.members} x {args.model} ({args.stem} stem), {args.precision}, batch "
          f"{args.batch}; retrain_s: the invalid members, {args.epochs} epoch(s) of "
          f"{args.samples} examples each, as sub-stacks; device: {record['device']}")
    print(benchlib.markdown_table(
        ["strategy", "invalid members", "unlearn s (median, min-max)", "unlearn compile s",
         "step s (median)", "retrain s", "total s", "status"],
        [[r["strategy"]] + ([r["invalid_members"],
                             benchlib.fmt_range(r["unlearn_s"], r["unlearn_s_min"],
                                                r["unlearn_s_max"], 4),
                             f"{r['unlearn_compile_s']:.1f}", f"{r['step_s_median']:.4f}",
                             f"{r['retrain_s']:.2f}", f"{r['total_s']:.2f}"]
                            if r["status"] == "ok" else ["-"] * 6) + [r["status"]]
         for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
