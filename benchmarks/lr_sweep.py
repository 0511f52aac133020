"""A learning-rate sweep as one stacked run against one run per learning rate: seconds, and the
final test accuracy of each learning rate from both.

Both sides train the same members on the bundled CIFAR-10 sample with the library's own jitted
step (`jaxunlearn.group.compile_group`): member i starts from row i of the stacked
initialisation and sees member i's batch order (`jaxunlearn.plans.member_rngs`), every member
on the whole training set, in the air recipe (SGD with Nesterov momentum, weight decay 5e-4,
label smoothing 0.2, a one-cycle schedule; no augmentation). The stacked run takes the
``--lrs`` per member (`learning_rate=a,b,...`: one compilation, each member's value traced);
the separate runs compile one one-member step per learning rate, as separate jobs would, and
run one after another in the same process. Seconds include compilation (timed apart too) and
scoring the test set once at the end. Prints a table; ``--out`` writes JSON with the seconds,
each learning rate's two accuracies and the largest difference between the two members'
parameters (0 when bit-identical; a traced learning rate may round apart from a compiled-in one
in the last bits, where XLA folds the constant with the schedule's scale).

    python benchmarks/lr_sweep.py --out benchmarks/results/lr_sweep.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import benchlib

RECIPE = dict(optimizer="sgd", weight_decay=5e-4, momentum=0.9, label_smoothing=0.2,
              schedule="onecycle", warmup=0.2)


def train(fns, state, images, labels, batches, scales, hyper=None):
    """Every step of ``batches`` (``idx``, ``weight``: ``[steps, m, b]``) with the schedule's
    ``scales`` ``[steps, m]``: the trained stack."""
    import jax.numpy as jnp

    idx, weight = batches
    active = jnp.ones(idx.shape[1], bool)
    each = {} if hyper is None else {"hyper": hyper}
    for s in range(idx.shape[0]):
        state, _ = fns.step(state, images, labels, jnp.asarray(idx[s]), jnp.asarray(weight[s]),
                            active, jnp.asarray(scales[s]), **each)
    return state


def accuracy(fns, state, images, test_ids, test_labels, batch: int) -> np.ndarray:
    """Each member's test accuracy ``[m]``."""
    import jax.numpy as jnp

    logits = np.concatenate([np.asarray(fns.logits(state, images,
                                                   jnp.asarray(test_ids[s:s + batch])))
                             for s in range(0, len(test_ids), batch)], axis=1)
    return (logits.argmax(-1) == test_labels[None]).mean(axis=1)


def measure(model: str, lrs: list[float], n_train: int, n_test: int, epochs: int, batch: int,
            layout: str, seed: int = 0) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxunlearn import data, plans, steps, timing
    from jaxunlearn.group import compile_group

    ds = data.load_sample().limit(n_train, n_test)
    images = jnp.asarray(np.concatenate([ds.train_images, ds.test_images]))
    labels = jnp.asarray(np.concatenate([ds.train_labels, ds.test_labels]))
    test_ids = (ds.n_train + np.arange(ds.n_test)).astype(np.int32)
    m = len(lrs)
    batches, scales = [], []
    for epoch in range(1, epochs + 1):  # member i's batches as a run's member i's
        rngs = plans.member_rngs((seed, 0, 1, 0), epoch, m)
        idx, weight = plans.epoch_batches(rngs, [np.arange(ds.n_train)] * m, batch)
        progress = (epoch - 1 + np.arange(idx.shape[0]) / idx.shape[0]) / epochs
        batches.append((idx, weight))
        scales.append(np.repeat(steps.lr_scale(RECIPE["schedule"], progress, RECIPE["warmup"])
                                .astype(np.float32)[:, None], m, axis=1))
    idx = np.concatenate([b[0] for b in batches])
    weight = np.concatenate([b[1] for b in batches])
    scale = np.concatenate(scales)

    def group(learning_rate, members):
        return compile_group(model, "cifar", "fp32", RECIPE["optimizer"], learning_rate,
                             RECIPE["weight_decay"], layout, False, 1, members,
                             RECIPE["momentum"], RECIPE["label_smoothing"])

    key = jax.random.PRNGKey(seed)
    stacked_fns = group(tuple(lrs), m)
    initial = jax.tree.map(np.asarray, stacked_fns.init(key, m))

    c0, t0 = timing.compile_seconds(), time.perf_counter()
    hyper = {"learning_rate": jnp.asarray(lrs, jnp.float32)}
    state = train(stacked_fns, jax.tree.map(jnp.asarray, initial), images, labels,
                  (idx, weight), scale, hyper)
    stacked_acc = accuracy(stacked_fns, state, images, test_ids, ds.test_labels, 300)
    stacked_params = jax.tree.map(np.asarray, state.params)
    stacked = {"seconds": time.perf_counter() - t0, "compile_seconds":
               timing.compile_seconds() - c0, "layout": stacked_fns.layout}

    c0, t0 = timing.compile_seconds(), time.perf_counter()
    separate_acc, gap = [], []
    for i, lr in enumerate(lrs):
        fns = group(lr, 1)
        row = jax.tree.map(lambda x, i=i: jnp.asarray(x[i:i + 1]), initial)
        state = train(fns, row, images, labels, (idx[:, i:i + 1], weight[:, i:i + 1]),
                      scale[:, i:i + 1])
        separate_acc.append(float(accuracy(fns, state, images, test_ids, ds.test_labels,
                                           300)[0]))
        gap.append(max(float(np.abs(a[i] - b[0]).max()) for a, b in zip(
            jax.tree.leaves(stacked_params), jax.tree.leaves(jax.tree.map(np.asarray,
                                                                          state.params)))))
    separate = {"seconds": time.perf_counter() - t0, "compile_seconds":
                timing.compile_seconds() - c0, "layout": fns.layout}
    rows = [{"learning_rate": lr, "stacked_test_accuracy": float(a),
             "separate_test_accuracy": b, "max_param_difference": g}
            for lr, a, b, g in zip(lrs, stacked_acc, separate_acc, gap)]
    return {"stacked": stacked, "separate": separate, "rows": rows,
            "steps": int(idx.shape[0]), "n_train": ds.n_train, "n_test": ds.n_test}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="air-s")
    p.add_argument("--lrs", type=float, nargs="+",
                   default=[0.8, 0.4, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005])
    p.add_argument("--n-train", type=int, default=500)
    p.add_argument("--n-test", type=int, default=300)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--layout", default="auto", help="member_parallel of the stacked run")
    p.add_argument("--out")
    args = p.parse_args(argv)
    load_before = os.getloadavg()  # other work on the machine slows both sides
    result = measure(args.model, args.lrs, args.n_train, args.n_test, args.epochs, args.batch,
                     args.layout)
    record = {"command": benchlib.command_line("lr_sweep.py", argv),
              "date": benchlib.utc_now(), "device": benchlib.jax_device(),
              "versions": benchlib.versions(), "args": vars(args),
              "cpu_count": os.cpu_count(), "load_average": {"before": load_before,
                                                              "after": os.getloadavg()},
              **result}
    s, e = result["stacked"], result["separate"]
    print(f"# {args.model}, {len(args.lrs)} learning rates, {result['n_train']} sample images, "
          f"{args.epochs} epochs of {result['steps'] // args.epochs} steps at batch "
          f"{args.batch}; device {record['device']}")
    print(benchlib.markdown_table(
        ["run", "layout", "seconds", "of which compiling"],
        [["one stacked run", s["layout"], f"{s['seconds']:.1f}", f"{s['compile_seconds']:.1f}"],
         [f"{len(args.lrs)} separate runs", e["layout"], f"{e['seconds']:.1f}",
          f"{e['compile_seconds']:.1f}"]]))
    print()
    print(benchlib.markdown_table(
        ["learning rate", "stacked test acc", "separate test acc", "max parameter difference"],
        [[f"{r['learning_rate']:g}", f"{r['stacked_test_accuracy']:.4f}",
          f"{r['separate_test_accuracy']:.4f}", f"{r['max_param_difference']:.1e}"]
         for r in result["rows"]]))
    if args.out:
        benchlib.write_record(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
