"""A/B of training-step variants in one process, timed round-robin so that the machine's drift
falls on every variant alike.

A variant is the library's one-member training step (`jaxunlearn.steps.train_step`, air
recipe: SGD with Nesterov momentum and weight decay, label smoothing 0.2; synthetic resident
data) with changes joined by ``+``:

* ``ynn=default``: XLA's default options (YNNPACK fusions on); ``ynn=none``: YNNPACK off (the
  library's choice on CPU); ``ynn=TYPE``: only that YNNPACK fusion type (``reduce``, ``dot``,
  ``eltwise``, ``individual_dot``, ``individual_convolution``). Without it: the library's options.
* ``pool=window``: the 2x2 max-pool as ``nn.max_pool`` (select-and-scatter gradient) instead of
  `models.max_pool_2x2`.
* ``bn=autodiff``: BatchNorm's gradient by autodiff instead of `models.batch_norm_train`'s VJP;
  ``bn=onepass``: statistics from sum(x) and sum(x^2) in one pass.
* ``gelu=erf``: the exact GELU (PyTorch's default) instead of the tanh form (Flax's default).
* ``b=N``: batch N (default ``--batch``); ``opt:NAME=JSON``: any other XLA compile option.

    python benchmarks/step_variants.py --model air-s:cifar --batch 128 --rounds 8 \\
        ynn=default ynn=none ynn=none+pool=window ynn=none+bn=autodiff ynn=none+gelu=erf
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import benchlib
from jaxunlearn import models, steps as step_fns, xla_options

YNN = "xla_cpu_experimental_ynn_fusion_type"


def parse(spec: str) -> dict:
    parts = {}
    for token in spec.split("+"):
        key, sep, value = token.partition("=")
        if not sep:
            raise ValueError(f"variant {spec!r}: write KEY=VALUE tokens joined by '+'")
        parts[key] = value
    return parts


def compile_options(parts: dict) -> dict | None:
    options = dict(xla_options.step_compiler_options() or {})
    ynn = parts.get("ynn")
    if ynn == "default":
        options.pop(YNN, None)
    elif ynn == "none":
        options[YNN] = ""
    elif ynn:
        options[YNN] = "LIBRARY_FUSION_TYPE_" + ynn.upper()
    options.update({k[4:]: json.loads(v) for k, v in parts.items() if k.startswith("opt:")})
    return options or None


def _autodiff_bn(x, w, scale, bias, epsilon):
    mean, var, count, _ = models._bn_stats(x, w)
    inv = jax.lax.rsqrt(var + epsilon) * scale
    return (x - mean) * inv + bias, mean, var, count


def _one_pass_stats(x, w):
    axes = tuple(range(x.ndim - 1))
    wb = w.reshape(x.shape[:1] + (1,) * (x.ndim - 1))
    xf = x.astype(jnp.float32)
    count = jnp.sum(w) * np.prod(x.shape[1:-1])
    n = jnp.maximum(count, 1.0)
    mean = jnp.sum(xf * wb, axis=axes) / n
    var = jnp.maximum(jnp.sum(jnp.square(xf) * wb, axis=axes) / n - jnp.square(mean), 0.0)
    return mean, var, count, n


@contextlib.contextmanager
def patched(parts: dict):
    """The model code changes a variant names, in force while its step is traced."""
    saved = {name: getattr(models, name) for name in ("max_pool_2x2", "batch_norm_train",
                                                      "_bn_stats")}
    gelu = nn.gelu
    try:
        if parts.get("pool") == "window":
            models.max_pool_2x2 = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
        if parts.get("bn") == "autodiff":
            models.batch_norm_train = _autodiff_bn
        elif parts.get("bn") == "onepass":
            models._bn_stats = _one_pass_stats
        if parts.get("gelu") == "erf":
            models.nn.gelu = lambda x: gelu(x, approximate=False)
        yield
    finally:
        for name, value in saved.items():
            setattr(models, name, value)
        models.nn.gelu = gelu


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="air-s:cifar", help="ARCH:STEM")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=8, help="round-robin rounds")
    p.add_argument("--per-round", type=int, default=4, help="steps per variant per round")
    p.add_argument("--out", help="JSON file to write")
    p.add_argument("variants", nargs="+")
    args = p.parse_args(argv)
    arch, _, stem = args.model.partition(":")
    n = 50_000
    images, labels = benchlib.resident_data(n)
    rng = np.random.default_rng(0)
    runs = []
    for spec in args.variants:
        parts = parse(spec)
        batch = int(parts.get("b", args.batch))
        model = models.make_model(arch, stem or "cifar")
        tx = step_fns.make_optimizer("sgd", 0.1, 5e-4)
        state = step_fns.init_member(model, tx, jax.random.PRNGKey(0))
        idx = jnp.asarray(rng.integers(0, n, batch), jnp.int32)
        weight, active = jnp.ones(batch, jnp.float32), jnp.array(True)

        # The resident data enters as arguments, as in the library's step (closed over, it
        # would be a 150 MB constant inside the program, which XLA compiles far more slowly).
        def step(s, images, labels, i, w, model=model, tx=tx):
            return step_fns.train_step(model, tx, False, s, images, labels, i, w, active,
                                       jnp.float32(1.0), 0.2)

        options = compile_options(parts)
        with patched(parts):
            t0 = time.perf_counter()
            compiled = jax.jit(step, donate_argnums=0).lower(
                state, images, labels, idx, weight).compile(options)
            compile_s = time.perf_counter() - t0
        state, loss = compiled(state, images, labels, idx, weight)
        jax.block_until_ready(loss)
        runs.append({"variant": spec, "batch": batch, "options": options,
                     "compile_s": compile_s, "call": compiled, "state": state,
                     "args": (images, labels, idx, weight), "times": []})
    for _ in range(args.rounds):
        for r in runs:
            for _ in range(args.per_round):
                t0 = time.perf_counter()
                r["state"], loss = r["call"](r["state"], *r["args"])
                jax.block_until_ready(loss)
                r["times"].append(time.perf_counter() - t0)
    rows = [{"variant": r["variant"], "batch": r["batch"], "options": r["options"],
             "compile_s": r["compile_s"], **benchlib.step_stats(r["times"], r["batch"])}
            for r in runs]
    print(f"# {args.model}: one member's training step, {args.rounds} rounds x "
          f"{args.per_round} steps per variant")
    print(benchlib.markdown_table(
        ["variant", "batch", "step ms (median, min-max)", "img/s", "compile s"],
        [[r["variant"], r["batch"], f"{r['step_s_median'] * 1000:.1f} "
          f"({r['step_s_min'] * 1000:.1f}-{r['step_s_max'] * 1000:.1f})",
          f"{r['member_images_per_s']:.0f}", f"{r['compile_s']:.1f}"] for r in rows]))
    if args.out:
        benchlib.write_record(args.out, {
            "command": benchlib.command_line("step_variants.py", argv),
            "date": benchlib.utc_now(), "device": benchlib.jax_device(),
            "versions": benchlib.versions(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
