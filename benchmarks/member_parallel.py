"""Training-step throughput of the member-parallel strategies (vmap vs map) on this machine.

Synthetic uint8 data resident on the device, the real jitted ensemble step (gather by index,
normalise, forward, backward, Adam), batch ``--batch`` per member. Prints a table and writes
JSON with the command, versions, device and date. Compilation is excluded (one warm-up step).

    python benchmarks/member_parallel.py --model resnet18 --stem imagenet --members 5 \
        --batch 32 --steps 3 --out benchmarks/results/cpu_member_parallel.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn import ensemble, steps as step_fns
from jaxunlearn.models import make_model


def time_strategy(model, tx, strategy: str, members: int, batch: int, steps: int,
                  n_data: int = 4096) -> dict:
    rng = np.random.default_rng(0)
    images = jax.device_put(rng.integers(0, 256, (n_data, 32, 32, 3), dtype=np.uint8))
    labels = jax.device_put(rng.integers(0, 10, n_data).astype(np.int32))
    state = jax.jit(ensemble.init_ensemble, static_argnums=(0, 1, 3))(
        model, tx, jax.random.PRNGKey(0), members)
    step = jax.jit(ensemble.make_train_step(model, tx, strategy), donate_argnums=0)
    idx = jnp.asarray(rng.integers(0, n_data, (members, batch)), jnp.int32)
    weight, active = jnp.ones((members, batch), jnp.float32), jnp.ones(members, bool)
    t0 = time.perf_counter()
    state, loss = step(state, images, labels, idx, weight, active)
    jax.block_until_ready(loss)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, loss = step(state, images, labels, idx, weight, active)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"strategy": strategy, "members": members, "batch": batch, "steps": steps,
            "first_step_s": compile_s, "step_s_median": median, "step_s_min": min(times),
            "step_s_max": max(times), "member_images_per_s": members * batch / median}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--stem", default="imagenet")
    parser.add_argument("--members", type=int, nargs="+", default=[5])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--strategies", nargs="+", default=list(ensemble.LAYOUTS))
    parser.add_argument("--out", help="JSON file to write")
    args = parser.parse_args(argv)

    model = make_model(args.model, args.stem)
    tx = step_fns.make_optimizer("adam", 1e-3)
    rows = [dict(model=args.model, stem=args.stem,
                 **time_strategy(model, tx, s, m, args.batch, args.steps))
            for m in args.members for s in args.strategies]
    device = jax.devices()[0]
    print(f"# {args.model} ({args.stem} stem), batch {args.batch}/member, fp32, Adam; "
          f"{device.platform} {device.device_kind}, {jax.device_count()} device(s)")
    print("| members | strategy | step s (median, min-max) | member-img/s | first step s |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['members']} | {r['strategy']} | {r['step_s_median']:.3f} "
              f"({r['step_s_min']:.3f}-{r['step_s_max']:.3f}) | {r['member_images_per_s']:.0f} "
              f"| {r['first_step_s']:.1f} |")
    if args.out:
        record = {"command": " ".join([pathlib.Path(sys.executable).name] + sys.argv),
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "device": f"{device.platform} {device.device_kind}",
                  "versions": {"python": platform.python_version(), "jax": jax.__version__},
                  "rows": rows}
        path = pathlib.Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
