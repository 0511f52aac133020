"""Where a training step's time goes on XLA:CPU: a profile of one member's jitted step.

The step is the experiment's own (`jaxunlearn.group.compile_group`: gather by index from
resident uint8 data, optional crop + flip, normalise, forward, backward, optimiser update),
one member, synthetic data, compiled with the options the library uses (or XLA's defaults
with ``--xla-defaults``). ``--steps`` steps run under `jax.profiler.trace` with XLA:CPU's
per-operation trace events on; each event is an XLA operation (a fusion, a convolution, a
library call), attributed to a part of the step by the name stack of the JAX operations it
holds (``jax.named_scope`` marks ``input``, ``loss`` and ``optimizer`` in `train.train_step`;
Flax module names mark the network's layers).

Two kinds of operation do not show their own time in the trace: XLA's own (Eigen)
convolutions run on the intra-op thread pool and their event covers only their launch, so
their time is reported as the step's wall time minus every other operation's
(``convolutions (Eigen), by difference``); YNNPACK convolutions run inside their event and
are timed directly.

    python benchmarks/step_profile.py --model air-s:cifar --batch 128 --steps 10 \\
        --out benchmarks/results/step_profile_air-s.json
    python benchmarks/step_profile.py --model air-s:cifar --batch 128 --steps 10 \\
        --xla-defaults   # XLA's default options (YNNPACK fusions on)

Label smoothing 0.2 and, for ``sgd``, Nesterov momentum 0.9 with weight decay 5e-4, as the air
recipe.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import benchlib
from jaxunlearn import xla_options
from jaxunlearn.group import compile_group

# (part, test on the operation's name stack) in order: the first that matches names it.
PARTS = (
    ("input: gather, augment, normalise", lambda s: "/input/" in s or s.endswith("/input")),
    ("loss", lambda s: "/loss" in s),
    ("optimizer update", lambda s: "/optimizer" in s),
    ("convolution backward", lambda s: "conv_general_dilated" in s and "transpose(" in s),
    ("convolution forward", lambda s: "conv_general_dilated" in s),
    # XLA fuses each BatchNorm's normalisation with the activation after it.
    ("BatchNorm + activation", lambda s: re.search(r"(BatchNorm|_bn)(_\d+)?/|gelu|relu|tanh",
                                                   s) is not None),
    ("max-pool", lambda s: re.search(r"max_pool|reduce_max|select_and_scatter|reduce_window",
                                     s) is not None),
    ("classifier", lambda s: "/fc/" in s),
)
OTHER = "other"
TRANSPOSES = "transposes feeding convolution gradients"
CONV_BY_DIFFERENCE = "convolutions (Eigen), by difference"


def hlo_name_stacks(hlo_text: str) -> dict[str, list[str]]:
    """Instruction name -> the op_name metadata of it and of every instruction in the
    computations it calls (transitively), from an optimised HLO module's text."""
    comp_ops, comp_calls, inst_ops, inst_calls = {}, {}, {}, {}
    current = None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head and not line.startswith(" "):
            current = head.group(1)
            comp_ops[current], comp_calls[current] = [], []
            continue
        inst = re.match(r"^\s+(?:ROOT )?%?([\w.\-]+) = ", line)
        if not inst or current is None:
            continue
        ops = re.findall(r'op_name="([^"]*)"', line)
        calls = re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", line)
        comp_ops[current].extend(ops)
        comp_calls[current].extend(calls)
        inst_ops[inst.group(1)], inst_calls[inst.group(1)] = ops, calls

    def gather(comp, seen):
        if comp in seen or comp not in comp_ops:
            return []
        seen.add(comp)
        out = list(comp_ops[comp])
        for c in comp_calls[comp]:
            out += gather(c, seen)
        return out

    return {name: ops + [o for c in inst_calls[name] for o in gather(c, set())]
            for name, ops in inst_ops.items()}


def part_of(name: str, stacks: dict[str, list[str]]) -> str:
    """The step part an XLA operation belongs to: by its name for convolutions and layout
    transposes, else by majority over its full name stacks."""
    if name.startswith(("convolution", "conv_general_dilated")):
        return CONV_BY_DIFFERENCE  # an Eigen convolution's launch: counted with the rest
    if name.startswith("transpose"):
        return TRANSPOSES
    votes = collections.Counter()
    full = [s for s in stacks.get(name, []) if s.startswith("jit(")]
    for s in full or stacks.get(name, []):
        votes[next((part for part, test in PARTS if test(s)), OTHER)] += 1
    if not votes:
        return OTHER
    return votes.most_common(1)[0][0]


def leaf_events(trace_dir: str, names: set[str]) -> dict[str, float]:
    """Total microseconds per XLA operation (events named like an HLO instruction)."""
    path = next(pathlib.Path(trace_dir).rglob("*.trace.json.gz"))
    doc = json.load(gzip.open(path))
    events = doc["traceEvents"] if isinstance(doc, dict) else doc
    total = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in names:
            total[e["name"]] += e.get("dur", 0)
    return total


def profile(model: str, stem: str, batch: int, steps: int, augment: bool, optimizer: str,
            defaults: bool, layout: str = "unroll") -> dict:
    fns = compile_group(model, stem, "fp32", optimizer, 0.1, 5e-4, layout, augment,
                        members=1, label_smoothing=0.2)
    options = None if defaults else xla_options.step_compiler_options()
    trace_options = {**(options or {})}
    if jax.default_backend() == "cpu":
        trace_options["xla_cpu_enable_xprof_traceme"] = True
    n = 50_000
    images, labels = benchlib.resident_data(n)
    idx = jnp.asarray(np.random.default_rng(1).integers(0, n, (1, batch)), jnp.int32)
    weight, active = jnp.ones((1, batch), jnp.float32), jnp.ones(1, bool)
    state = fns.init(jax.random.PRNGKey(0), 1)
    args = (images, labels, idx, weight, active)
    # The same program with and without trace events: the events cost a little time, so the
    # step time is measured on the plain one.
    lowered = jax.jit(fns.step.__wrapped__ if hasattr(fns.step, "__wrapped__") else fns.step,
                      donate_argnums=0).lower(state, *args)
    plain = lowered.compile(options)
    traced = lowered.compile(trace_options)
    state, _, times = benchlib.time_calls(lambda s: plain(s, *args), state, steps,
                                          jax.block_until_ready)
    state, loss = traced(state, *args)
    jax.block_until_ready(loss)
    stacks = hlo_name_stacks(traced.as_text())
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            t0 = time.perf_counter()
            for _ in range(steps):
                state, loss = traced(state, *args)
                jax.block_until_ready(loss)
            traced_s = (time.perf_counter() - t0) / steps
        per_op = leaf_events(tmp, set(stacks))
    parts = collections.Counter()
    for name, us in per_op.items():
        library = name.startswith(("ynn_fusion", "xnn_fusion", "onednn"))
        part = part_of(name, stacks)
        parts[part + (" (YNNPACK)" if library and "convolution" in part else "")] += us
    ms = {k: v / steps / 1000 for k, v in parts.items()}
    ms[CONV_BY_DIFFERENCE] = max(traced_s * 1000 - sum(v for k, v in ms.items()
                                                       if k != CONV_BY_DIFFERENCE), 0.0)
    step_ms = float(np.median(times)) * 1000
    return {"model": model, "stem": stem, "batch": batch, "augment": augment, "layout": layout,
            "optimizer": optimizer, "compiler_options": options, "steps": steps,
            "step_ms_median": step_ms, "images_per_s": batch / step_ms * 1000,
            "traced_step_ms": traced_s * 1000,
            "parts_ms": dict(sorted(ms.items(), key=lambda kv: -kv[1]))}


def table(rec: dict) -> str:
    total = sum(rec["parts_ms"].values())
    rows = [[k, f"{v:.1f}", f"{100 * v / total:.0f}%"] for k, v in rec["parts_ms"].items()
            if v >= 0.05]
    return benchlib.markdown_table(["part of the step", "ms per step", "share"], rows)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="air-s:cifar", help="ARCH:STEM")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--augment", action="store_true")
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adam", "adamw"))
    p.add_argument("--xla-defaults", action="store_true",
                   help="compile with XLA's default options, not the library's")
    p.add_argument("--layout", default="unroll",
                   help="member layout of the stack of one (unroll: the plain model)")
    p.add_argument("--out", help="JSON file to write")
    args = p.parse_args(argv)
    arch, _, stem = args.model.partition(":")
    rec = profile(arch, stem or "cifar", args.batch, args.steps, args.augment, args.optimizer,
                  args.xla_defaults, args.layout)
    print(f"# {args.model} batch {args.batch}, {args.optimizer}, options "
          f"{rec['compiler_options']}: {rec['step_ms_median']:.1f} ms/step "
          f"({rec['images_per_s']:.0f} img/s); traced {rec['traced_step_ms']:.1f} ms/step")
    print(table(rec))
    if args.out:
        benchlib.write_record(args.out, {"command": benchlib.command_line("step_profile.py", argv),
                                         "date": benchlib.utc_now(),
                                         "device": benchlib.jax_device(),
                                         "versions": benchlib.versions(), **rec})
    return 0


if __name__ == "__main__":
    sys.exit(main())
