"""The convolution kernels alone: XLA:CPU's (with the library's options and with XLA's
defaults, YNNPACK) against PyTorch's, for the 3x3 convolutions of an air net.

Each of the net's convolutions (stride 1, SAME padding, NHWC) is timed three ways: the forward
convolution, the gradient with respect to its input and the gradient with respect to its
kernel, each as its own jitted program on resident float32 data (median of ``--repeats`` calls
after a warm-up). PyTorch runs the same three on channels-last tensors (``conv2d``,
``torch.nn.grad.conv2d_input`` and ``conv2d_weight``) with its default thread count. The stem's
input gradient is listed but a training step never computes it (the images need no gradient).

    python benchmarks/conv_kernels.py --model air-s --batch 128 \\
        --out benchmarks/results/cpu_conv_kernels_air_s.json
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time

import jax

import benchlib
from jaxunlearn import xla_options

# model -> [(spatial size, input channels, output channels)], in the net's order.
LAYERS = {
    "air-s": [(32, 3, 16), (32, 16, 32), (16, 32, 32), (16, 32, 64), (8, 64, 64), (8, 64, 64),
              (4, 64, 64)],
    "air-m": [(32, 3, 32), (32, 32, 64), (16, 64, 64), (16, 64, 128), (8, 128, 128),
              (8, 128, 128), (4, 128, 128)],
}
KINDS = ("forward", "input grad", "kernel grad")


def _median_ms(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1000


def jax_times(size, cin, cout, batch, repeats, options) -> dict:
    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(keys[0], (batch, size, size, cin))
    w = jax.random.normal(keys[1], (3, 3, cin, cout)) * 0.1
    dy = jax.random.normal(keys[2], (batch, size, size, cout))
    programs = {"forward": (conv, (x, w)),
                "input grad": (lambda x, w, dy: jax.vjp(conv, x, w)[1](dy)[0], (x, w, dy)),
                "kernel grad": (lambda x, w, dy: jax.vjp(conv, x, w)[1](dy)[1], (x, w, dy))}
    out = {}
    for kind, (fn, args) in programs.items():
        compiled = jax.jit(fn).lower(*args).compile(options)
        out[kind] = _median_ms(lambda c=compiled, a=args: jax.block_until_ready(c(*a)), repeats)
    return out


def torch_times(size, cin, cout, batch, repeats) -> dict:
    import torch

    cl = torch.channels_last
    x = torch.randn(batch, cin, size, size).to(memory_format=cl)
    w = (torch.randn(cout, cin, 3, 3) * 0.1).to(memory_format=cl)
    dy = torch.randn(batch, cout, size, size).to(memory_format=cl)
    F = torch.nn.functional
    calls = {"forward": lambda: F.conv2d(x, w, padding=1),
             "input grad": lambda: torch.nn.grad.conv2d_input(x.shape, w, dy, padding=1),
             "kernel grad": lambda: torch.nn.grad.conv2d_weight(x, w.shape, dy, padding=1)}
    with torch.no_grad():
        return {kind: _median_ms(call, repeats) for kind, call in calls.items()}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="air-s", choices=sorted(LAYERS))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--layers", type=int, default=None, help="only the first N convolutions")
    p.add_argument("--out", help="JSON file to write")
    args = p.parse_args(argv)
    impls = {"xla (library options)": xla_options.step_compiler_options(),
             "xla defaults (YNNPACK)": None}
    has_torch = importlib.util.find_spec("torch") is not None
    rows = []
    for i, (size, cin, cout) in enumerate(LAYERS[args.model][:args.layers]):
        gflop = 2 * args.batch * size * size * 9 * cin * cout / 1e9
        for impl, options in impls.items():
            rows.append({"layer": i, "size": size, "cin": cin, "cout": cout, "impl": impl,
                         "gflop": gflop, "ms": jax_times(size, cin, cout, args.batch,
                                                          args.repeats, options)})
        if has_torch:
            rows.append({"layer": i, "size": size, "cin": cin, "cout": cout,
                         "impl": "torch channels-last", "gflop": gflop,
                         "ms": torch_times(size, cin, cout, args.batch, args.repeats)})
    table = [[f"{r['size']}x{r['size']} {r['cin']}->{r['cout']}", r["impl"]]
             + [f"{r['ms'][k]:.1f} ({r['gflop'] / r['ms'][k] * 1000:.0f})" for k in KINDS]
             for r in rows]
    totals = {}
    for r in rows:  # a step's convolutions: every forward and kernel grad, no stem input grad
        t = totals.setdefault(r["impl"], 0.0)
        totals[r["impl"]] = t + r["ms"]["forward"] + r["ms"]["kernel grad"] + (
            r["ms"]["input grad"] if r["layer"] > 0 else 0.0)
    print(f"# {args.model} convolutions, batch {args.batch}: ms (GFLOP/s)")
    print(benchlib.markdown_table(["layer", "implementation"] + list(KINDS), table))
    print()
    print(benchlib.markdown_table(["implementation", "a training step's convolutions, ms"],
                                  [[k, f"{v:.1f}"] for k, v in totals.items()]))
    if args.out:
        benchlib.write_record(args.out, {
            "command": benchlib.command_line("conv_kernels.py", argv), "date": benchlib.utc_now(),
            "device": benchlib.jax_device(), "versions": benchlib.versions(),
            "rows": rows, "step_totals_ms": totals})
    return 0


if __name__ == "__main__":
    sys.exit(main())
