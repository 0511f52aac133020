"""Seconds to retrain k of M members for one epoch, for k = 1..M: what a deletion costs.

The experiment's own training path (`jaxunlearn.trainer.Trainer.train` on a
`jaxunlearn.group.ModelGroup`): each member has its own sample of ``--samples`` synthetic
examples resident on the device, batch ``--batch``; the k retrained members run as sub-stacks
(`jaxunlearn.ensemble.substacks`) under each ``--policies`` entry (``full`` is the stacked step
over all M members with the others masked out, the behaviour before sub-stacks). Every (policy,
k) is trained once to compile, then timed ``--repeats`` times (median, compilation excluded by
construction: the timed calls compile nothing). Prints a table of seconds and of the ratio to
retraining all M; ``--out`` writes JSON with ``{"seconds": {policy: {"1": ..., "M": ...}}}``
beside the command, date, device and versions.

    python benchmarks/retrain_cost.py --model tiny --stem cifar --members 5 --batch 128 \\
        --samples 512 --out benchmarks/results/cpu_retrain_cost_tiny.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

import benchlib


def setup(model: str, stem: str, layout: str, policy: str, members: int, batch: int,
          samples: int, epochs: int = 1, precision: str = "fp32", augment: bool = False):
    """A stacked group on synthetic resident data (``samples`` examples per member), the
    trainer, and the stage every member trains on: ``(group, trainer, stage)``."""
    import jax

    from jaxunlearn import config
    from jaxunlearn.group import ModelGroup
    from jaxunlearn.stages import Stage
    from jaxunlearn.trainer import Trainer

    rng = np.random.default_rng(0)
    n = members * samples
    data = (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 10, n).astype(np.int32),
            rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 10, 16).astype(np.int32))
    stage = Stage("ensemble", 1, 1, 1, 1, [np.arange(i * samples, (i + 1) * samples)
                                          for i in range(members)], None)
    cfg = config.apply_overrides(config.get_preset("smoke"), {
        "model": model, "stem": stem, "members": members, "member_parallel": layout,
        "substacks": policy, "batch_size": batch, "epochs": epochs, "eval_every_epoch": False,
        "precision": precision, "augment": augment})
    group = ModelGroup("ensemble", "ensemble", model, members, cfg, jax.random.PRNGKey(0), data)
    return group, Trainer(cfg, np.zeros(n, bool)), stage


def time_training(group, trainer, stage, chosen: np.ndarray, repeats: int):
    """Trains ``chosen`` once (compiling what it needs), then ``repeats`` times, each waited
    for: ``(first seconds, compile seconds, [timed seconds])``."""
    import jax

    from jaxunlearn import timing

    def once():
        t0 = time.perf_counter()
        trainer.train(group, stage, chosen, kind="retrain")
        jax.block_until_ready(group.state)
        return time.perf_counter() - t0

    c0 = timing.compile_seconds()
    first = once()
    return first, timing.compile_seconds() - c0, [once() for _ in range(repeats)]


def measure(model: str, stem: str, layout: str, policies, members: int, batch: int,
            samples: int, repeats: int, precision: str = "fp32") -> dict:
    out, compile_s, layouts = {}, {}, {}
    for policy in policies:
        group, trainer, stage = setup(model, stem, layout, policy, members, batch, samples,
                                      precision=precision)
        layouts[policy] = group.layout
        out[policy], compile_s[policy] = {}, {}
        for k in range(1, members + 1):
            chosen = np.zeros(members, bool)
            chosen[:k] = True
            _, compile_s[policy][str(k)], times = time_training(group, trainer, stage, chosen,
                                                                 repeats)
            out[policy][str(k)] = statistics.median(times)
            print(f"{policy} k={k}: {out[policy][str(k)]:.3f} s", file=sys.stderr, flush=True)
    return {"seconds": out, "compile_seconds": compile_s, "layout": layouts}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--stem", default="cifar")
    p.add_argument("--layout", default="auto", help="member_parallel: auto, vmap, map, unroll")
    p.add_argument("--policies", nargs="+", default=["pow2", "ones", "exact", "full"])
    p.add_argument("--members", type=int, default=5)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--samples", type=int, default=512, help="examples per member")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--out")
    args = p.parse_args(argv)
    result = measure(args.model, args.stem, args.layout, args.policies, args.members,
                     args.batch, args.samples, args.repeats, args.precision)
    record = {"command": benchlib.command_line("retrain_cost.py", argv),
              "date": benchlib.utc_now(), "device": benchlib.jax_device(),
              "versions": benchlib.versions(), "args": vars(args), **result}
    m = args.members
    rows = []
    for policy, by_k in result["seconds"].items():
        full = by_k[str(m)]
        rows.append([policy, result["layout"][policy]]
                    + [f"{by_k[str(k)]:.3f} ({by_k[str(k)] / full:.2f}x)"
                       for k in range(1, m + 1)])
    print(f"# {args.model} ({args.stem} stem), {m} members, batch {args.batch}, "
          f"{args.samples} examples per member, one epoch; device {record['device']}")
    print(benchlib.markdown_table(["policy", "layout"] + [f"k={k} s (/ all {m})"
                                                          for k in range(1, m + 1)], rows))
    if args.out:
        benchlib.write_record(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
