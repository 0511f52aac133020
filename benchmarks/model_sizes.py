"""Parameters and forward FLOPs per 32x32 image of every model jaxunlearn offers.

FLOPs are XLA's own count for the lowered inference forward pass of one image (a
multiply-add counts as two), before any backend optimisation, so they do not depend on the
machine. Prints a Markdown table; ``--out FILE`` writes it as JSON too.

    python benchmarks/model_sizes.py --out benchmarks/results/model_sizes.json
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp

from jaxunlearn.models import AIRNETS, RESNETS, make_model


def size(name: str, stem: str) -> dict:
    model = make_model(name, stem)
    x = jnp.zeros((1, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    params = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
    lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x)
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"model": name, "stem": stem if name in RESNETS else "-", "params": int(params),
            "gflops": float(cost["flops"]) / 1e9}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = [size(name, "cifar") for name in AIRNETS]
    rows += [size(name, stem) for name in ("tiny", "resnet18", "resnet152")
             for stem in ("cifar", "imagenet")]
    print("| model | stem | parameters | GFLOPs / image (forward) |")
    print("| --- | --- | ---: | ---: |")
    for r in rows:
        print(f"| `{r['model']}` | {r['stem']} | {r['params']:,} | {r['gflops']:.3f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "python " + " ".join(sys.argv), "jax": jax.__version__,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
