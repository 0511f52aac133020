"""Training-step throughput of stacked ResNet ensembles over a grid, in member-images/s.

Each grid cell is one model, precision, member count and member-parallel strategy. A cell times
the experiment's own jitted step (`jaxunlearn.group.compile_group`: gather the batch by index
from the resident uint8 training set, optionally augment (random crop + flip) on the device,
normalise, forward, backward, ``--optimizer``), batch ``--batch`` per member. Compilation is timed
apart (ahead of time), then one warm-up step, then ``--steps`` timed steps: the row gives the
median step time with min-max, and member-images/s = members x batch / step time.

    python benchmarks/throughput.py --models resnet18:imagenet resnet18:cifar \
        --members 1 5 10 20 --strategies vmap map hybrid:5 --precisions fp32 bf16 \
        --batch 512 --steps 5 --no-augment --out benchmarks/results/throughput.json

Grid rules:
  * A model is ``ARCH:STEM`` or ``ARCH:STEM:PRECISION`` (the latter ignores ``--precisions``).
  * ``--single-models`` (for example ``resnet152:cifar:bf16``) run only with
    ``--single-members`` (default 1).
  * ``hybrid:K`` is skipped where the member count is not a multiple of K; one member runs as
    the plain model (``unroll``, as a `ModelGroup` of one), whatever ``--strategies`` says.
  * ``--torch`` adds, per model, precision and member count, two rows of the PyTorch reference
    (`torch_reference.py`: the same architecture, batch, optimiser and label smoothing, the
    members trained one after another on synthetic resident data, torch's default thread count
    (one per core, as XLA:CPU's pool), channels-last and NCHW); "torch not installed" where
    torch is missing.
  * ``--pipeline`` replaces each JAX row by an input-pipeline row: the real step (gather +
    augmentation + normalise) against the same model step on a resident, already normalised
    float32 batch per member (no gather, no augmentation), and overhead % =
    (real - synthetic) / synthetic step time.

Memory: every row runs in a fresh subprocess (``--no-isolate`` runs them in this process) so
that its peak is its own: the device allocator's ``peak_bytes_in_use`` on a GPU, the process's
peak RSS (host memory) on a CPU. With ``--no-isolate`` the peak is cumulative over the rows and
the row says so (``peak_scope``). ``xla_step_bytes`` is XLA's plan for one call of the step
(arguments + outputs + temporaries - donated buffers), exact per row in either mode. An
out-of-memory row records ``OOM``; a row past ``--row-timeout`` records ``timeout``; rows not
started within ``--budget-s`` record ``skipped: budget``. The JSON (``--out``) is rewritten
after every row, so an interrupted run keeps what it measured; ``--skip-done FILE...`` skips
cells already measured ``ok`` in earlier JSON files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import benchlib
from jaxunlearn import ensemble, steps as step_fns, xla_options
from jaxunlearn.group import compile_group
from jaxunlearn.models import ARCHITECTURES, PRECISIONS, STEMS

ROOT = pathlib.Path(__file__).resolve().parents[1]
# optimizer -> (learning rate, weight decay), as torch_reference.make_optimizer.
OPTIMIZERS = {"adam": (1e-3, 0.0), "sgd": (0.1, 5e-4)}
ROW_PREFIX = "ROW "


@dataclasses.dataclass(frozen=True)
class Cell:
    """One measurement. ``impl``: ``jax`` (throughput), ``pipeline`` or ``torch``."""

    impl: str
    model: str
    stem: str
    precision: str
    members: int
    strategy: str
    batch: int
    augment: bool
    steps: int
    n_data: int
    optimizer: str = "adam"
    label_smoothing: float = 0.0

    def key(self) -> tuple:
        return (self.impl, self.model, self.stem, self.precision, self.members, self.strategy,
                self.batch, self.augment, self.optimizer, self.label_smoothing)

    def label(self) -> str:
        return (f"{self.impl} {self.model}:{self.stem} {self.precision} M={self.members} "
                f"{self.strategy} b={self.batch} {self.optimizer}"
                f"{' aug' if self.augment else ''}")


# ---------------------------------------------------------------------------------------------
# The grid (pure).

def parse_model(spec: str, precisions) -> list[tuple[str, str, str]]:
    """``ARCH:STEM[:PRECISION]`` -> ``[(arch, stem, precision), ...]``."""
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"model {spec!r}: write ARCH:STEM or ARCH:STEM:PRECISION, "
                         "for example resnet18:cifar or resnet152:cifar:bf16")
    arch, stem, chosen = parts[0], parts[1], parts[2:] or list(precisions)
    checks = [(arch, ARCHITECTURES), (stem, STEMS)] + [(p, PRECISIONS) for p in chosen]
    for value, allowed in checks:
        if value not in allowed:
            raise ValueError(f"model {spec!r}: {value!r} is not one of {sorted(allowed)}")
    return [(arch, stem, p) for p in chosen]


def strategies_for(members: int, strategies) -> list[str]:
    """The strategies that apply to ``members``: one member runs as the plain model
    (``unroll``) only, as a `ModelGroup` of one does, and ``hybrid:K`` needs a multiple of K."""
    if members == 1:
        return ["unroll"] if strategies else []
    return [s for s in strategies
            if members % (ensemble.hybrid_group_size(s) or 1) == 0]


TORCH_LAYOUTS = ("sequential/channels_last", "sequential/nchw")  # members one after another


def grid(models, single_models, members, single_members, strategies, precisions, batch,
         steps, augment, n_data, pipeline=False, torch=False, optimizer="adam",
         label_smoothing=0.0) -> list[Cell]:
    """All cells, in order (per model, precision and member count, the torch rows first: one
    per memory format), without duplicates."""
    cells = []
    for specs, member_counts in ((models, members), (single_models, single_members)):
        for spec in specs:
            for arch, stem, precision in parse_model(spec, precisions):
                for m in member_counts:
                    common = dict(model=arch, stem=stem, precision=precision, members=m,
                                  batch=batch, steps=steps, n_data=n_data, optimizer=optimizer,
                                  label_smoothing=label_smoothing)
                    if torch:
                        cells += [Cell("torch", strategy=layout, augment=False, **common)
                                  for layout in TORCH_LAYOUTS]
                    for s in strategies_for(m, strategies):
                        cells.append(Cell("pipeline" if pipeline else "jax", strategy=s,
                                          augment=True if pipeline else augment, **common))
    return list(dict.fromkeys(cells))


# ---------------------------------------------------------------------------------------------
# Measurements (run in the row's own process unless --no-isolate).

def make_synthetic_step(model, tx, strategy: str):
    """The ensemble step without an input pipeline: ``step(state, x, y, weight, active)`` with a
    resident, already normalised float32 batch ``x[m, b, 32, 32, 3]`` per member. It mirrors
    `jaxunlearn.steps.train_step` minus the gather, augmentation and normalisation."""

    def member_step(state, x, y, weight, active):
        def loss_fn(params):
            logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats},
                                          x, train=True, weight=weight, mutable=["batch_stats"])
            total = jnp.sum(step_fns.cross_entropy(logits, y) * weight)
            return total / jnp.maximum(jnp.sum(weight), 1.0), (updates["batch_stats"], total)

        grads, (batch_stats, total) = jax.grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new = step_fns.MemberState(params=optax.apply_updates(state.params, updates),
                                   batch_stats=batch_stats, opt_state=opt_state,
                                   step=state.step + 1, key=state.key)
        take = jnp.logical_and(active, jnp.sum(weight) > 0)
        new = jax.tree.map(lambda n, o: jnp.where(take, n, o), new, state)
        return new, jnp.where(take, total, 0.0)

    def step(state, x, y, weight, active):
        return ensemble.over_members(strategy, member_step, (state, x, y, weight, active))

    return step


def _compile(cell: Cell, strategy: str, augment: bool):
    lr, wd = OPTIMIZERS[cell.optimizer]
    return compile_group(cell.model, cell.stem, cell.precision, cell.optimizer, lr, wd, strategy,
                         augment, members=cell.members, label_smoothing=cell.label_smoothing)


def _time_step(jitted, state, args, steps: int, images_per_step: int) -> dict:
    compiled, compile_s, xla = benchlib.compile_timed(jitted, state, *args)
    _, first, times = benchlib.time_calls(lambda s: compiled(s, *args), state, steps,
                                          jax.block_until_ready)
    return {"compile_s": compile_s, "first_step_s": first, "xla_step_bytes": xla,
            **benchlib.step_stats(times, images_per_step)}


def measure_jax(cell: Cell) -> dict:
    """The experiment's jitted step on resident uint8 data (gather, [augment,] normalise)."""
    fns = _compile(cell, cell.strategy, cell.augment)
    images, labels = benchlib.resident_data(cell.n_data)
    rng = np.random.default_rng(1)
    idx = jnp.asarray(rng.integers(0, cell.n_data, (cell.members, cell.batch)), jnp.int32)
    weight = jnp.ones((cell.members, cell.batch), jnp.float32)
    active = jnp.ones(cell.members, bool)
    t0 = time.perf_counter()
    state = jax.block_until_ready(fns.init(jax.random.PRNGKey(0), cell.members))
    init_s = time.perf_counter() - t0
    return {"init_s": init_s, "layout": fns.layout,
            **_time_step(fns.step, state, (images, labels, idx, weight, active), cell.steps,
                         cell.members * cell.batch)}


def measure_pipeline(cell: Cell) -> dict:
    """Real step (gather + augmentation + normalise) vs the same step on resident float32."""
    real = measure_jax(dataclasses.replace(cell, augment=True))
    fns = _compile(cell, cell.strategy, True)
    rng = np.random.default_rng(2)
    shape = (cell.members, cell.batch)
    x = jnp.asarray(rng.standard_normal(shape + (32, 32, 3), dtype=np.float32))
    y = jnp.asarray(rng.integers(0, 10, shape), jnp.int32)
    weight, active = jnp.ones(shape, jnp.float32), jnp.ones(cell.members, bool)
    step = jax.jit(make_synthetic_step(fns.model, fns.tx, fns.layout), donate_argnums=0,
                   compiler_options=xla_options.step_compiler_options())
    state = fns.init(jax.random.PRNGKey(0), cell.members)
    synthetic = _time_step(step, state, (x, y, weight, active), cell.steps,
                           cell.members * cell.batch)
    overhead = (real["step_s_median"] - synthetic["step_s_median"]) / synthetic["step_s_median"]
    return {**real, **{f"synthetic_{k}": v for k, v in synthetic.items()},
            "pipeline_overhead_pct": 100.0 * overhead}


def measure_torch(cell: Cell) -> dict:
    try:
        import torch_reference
    except ImportError:
        return {"status": "torch not installed"}
    memory_format = cell.strategy.partition("/")[2] or "channels_last"
    return {"params": torch_reference.count_params(torch_reference.make_model(cell.model,
                                                                               cell.stem)),
            **torch_reference.measure(cell.model, cell.stem, cell.members, cell.precision,
                                      cell.batch, cell.steps, optimizer=cell.optimizer,
                                      label_smoothing=cell.label_smoothing,
                                      memory_format=memory_format)}


MEASURE = {"jax": measure_jax, "pipeline": measure_pipeline, "torch": measure_torch}


def run_cell(cell: Cell, isolated: bool) -> dict:
    """Measures one cell in this process; failures become the row's status."""
    row = dataclasses.asdict(cell)
    try:
        row.update(MEASURE[cell.impl](cell))
    except Exception as exc:
        row["status"] = benchlib.failure_status(exc)
    row.setdefault("status", "ok")
    if cell.impl != "torch":
        try:
            row.update(benchlib.jax_peak_memory(), device=benchlib.jax_device())
        except Exception as exc:
            row["peak_error"] = benchlib.failure_status(exc)
    if "peak_bytes" in row:
        row["peak_scope"] = "row" if isolated else "process (cumulative over rows)"
    return row


def run_isolated(cell: Cell, timeout: float) -> dict:
    """Runs the cell in a fresh Python process (``--row``) and returns its row."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--row",
           json.dumps(dataclasses.asdict(cell))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**dataclasses.asdict(cell), "status": f"timeout after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(ROW_PREFIX):
            return json.loads(line[len(ROW_PREFIX):])
    if benchlib.is_oom(proc.stderr):  # a crash on out-of-memory, past Python's reach
        return {**dataclasses.asdict(cell), "status": "OOM"}
    tail = " / ".join(proc.stderr.strip().splitlines()[-3:])[-300:]
    return {**dataclasses.asdict(cell), "status": f"error: exit {proc.returncode}: {tail}"}


# ---------------------------------------------------------------------------------------------
# Driver.

def done_keys(paths) -> set:
    """Keys of the ``ok`` rows in earlier throughput JSON records (files that are missing or
    hold other records, such as unlearn_latency.py's, add nothing)."""
    names = [f.name for f in dataclasses.fields(Cell)]
    keys = set()
    for path in map(pathlib.Path, paths):
        rows = json.loads(path.read_text()).get("rows", []) if path.is_file() else []
        keys.update(Cell(**{n: r[n] for n in names}).key() for r in rows
                    if r.get("status") == "ok" and all(n in r for n in names))
    return keys


def tables(rows) -> str:
    """The Markdown tables: throughput (JAX and torch), then input-pipeline overhead."""
    def peak(r):
        return (f"{benchlib.fmt_gib(r.get('peak_bytes'))} ({r['peak_memory']})"
                if "peak_bytes" in r else "-")

    def ok(r):
        return r.get("status") == "ok"

    def common(r):
        strategy = r["strategy"] + (f" -> {r['layout']}" if r["strategy"] == "auto"
                                    and "layout" in r else "")
        return [r["impl"], f"{r['model']} {r['stem']}", r["precision"],
                "yes" if r["augment"] else "no", f"{r['members']} x {r['batch']}", strategy]

    out = []
    plain = [r for r in rows if r["impl"] != "pipeline"]
    if plain:
        out.append(benchlib.markdown_table(
            ["impl", "model, stem", "precision", "augment", "members x batch", "strategy",
             "step s (median, min-max)", "member-img/s (median, min-max)", "compile s",
             "peak GiB", "XLA step GiB", "status"],
            [common(r) + ([benchlib.fmt_range(r["step_s_median"], r["step_s_min"],
                                              r["step_s_max"], 4),
                           benchlib.fmt_range(r["member_images_per_s"],
                                              r["member_images_per_s_min"],
                                              r["member_images_per_s_max"], 0),
                           f"{r['compile_s']:.1f}" if "compile_s" in r else "-",
                           peak(r), benchlib.fmt_gib(r.get("xla_step_bytes"))]
                          if ok(r) else ["-"] * 5) + [r["status"]] for r in plain]))
    pipe = [r for r in rows if r["impl"] == "pipeline"]
    if pipe:
        out.append(benchlib.markdown_table(
            ["model, stem", "precision", "members x batch", "strategy",
             "real step s (gather+augment)", "synthetic step s (resident f32)",
             "real member-img/s", "synthetic member-img/s", "overhead %", "peak GiB", "status"],
            [[f"{r['model']} {r['stem']}", r["precision"], f"{r['members']} x {r['batch']}",
              r["strategy"]]
             + ([f"{r['step_s_median']:.4f}", f"{r['synthetic_step_s_median']:.4f}",
                 f"{r['member_images_per_s']:,.0f}",
                 f"{r['synthetic_member_images_per_s']:,.0f}",
                 f"{r['pipeline_overhead_pct']:+.1f}", peak(r)] if ok(r) else ["-"] * 6)
             + [r["status"]] for r in pipe]))
    return "\n\n".join(out)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="*", default=["resnet18:imagenet"],
                   help="ARCH:STEM or ARCH:STEM:PRECISION, run at every --members")
    p.add_argument("--single-models", nargs="*", default=[],
                   help="models run only at --single-members (for example resnet152:cifar:bf16)")
    p.add_argument("--members", type=int, nargs="+", default=[1, 5])
    p.add_argument("--single-members", type=int, nargs="+", default=[1])
    p.add_argument("--strategies", nargs="+", default=["vmap", "map"],
                   help="auto, vmap, map, unroll, hybrid:K (skipped where members %% K != 0); "
                        "an auto row says which layout it picked")
    p.add_argument("--precisions", nargs="+", default=["fp32"], choices=("fp32", "bf16"))
    p.add_argument("--batch", type=int, default=32, help="images per member per step")
    p.add_argument("--optimizer", default="adam", choices=("adam", "sgd"),
                   help="adam (lr 1e-3) or sgd (Nesterov momentum 0.9, lr 0.1, weight decay "
                        "5e-4), in the JAX and the torch rows alike")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=False,
                   help="random crop + flip on the device in the JAX step")
    p.add_argument("--n-data", type=int, default=50_000,
                   help="resident synthetic training images (CIFAR-10 has 50,000)")
    p.add_argument("--pipeline", action="store_true",
                   help="measure the input-pipeline overhead instead of plain throughput")
    p.add_argument("--torch", action="store_true", help="add PyTorch reference rows")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                   help="each row in a fresh subprocess (per-row peak memory)")
    p.add_argument("--row-timeout", type=float, default=600.0,
                   help="seconds per isolated row before it is killed")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no row after this many seconds (those rows: skipped: budget)")
    p.add_argument("--skip-done", nargs="*", default=[],
                   help="earlier JSON files: skip cells they measured ok")
    p.add_argument("--out", help="JSON file to write (rewritten after every row)")
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: measure one cell, print its row
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.row:
        print(ROW_PREFIX + json.dumps(run_cell(Cell(**json.loads(args.row)), isolated=True)))
        return 0
    with benchlib.sigterm_exits():
        return run_grid(args, argv)


def run_grid(args, argv) -> int:
    for s in args.strategies:
        ensemble.resolve_layout(s)  # fail fast on a misspelt strategy
    cells = grid(args.models, args.single_models, args.members, args.single_members,
                 args.strategies, args.precisions, args.batch, args.steps, args.augment,
                 args.n_data, pipeline=args.pipeline, torch=args.torch,
                 optimizer=args.optimizer, label_smoothing=args.label_smoothing)
    done = done_keys(args.skip_done)
    skipped = sum(c.key() in done for c in cells)
    cells = [c for c in cells if c.key() not in done]
    record = {"command": benchlib.command_line("throughput.py", argv), "date": benchlib.utc_now(),
              "device": None, "versions": benchlib.versions(), "args": vars(args), "rows": []}
    start = time.perf_counter()
    for i, cell in enumerate(cells, 1):
        elapsed = time.perf_counter() - start
        if args.budget_s is not None and elapsed > args.budget_s:
            row = {**dataclasses.asdict(cell), "status": "skipped: budget"}
        elif args.isolate:
            row = run_isolated(cell, args.row_timeout)
        else:
            row = run_cell(cell, isolated=False)
        record["rows"].append(row)
        if record["device"] is None and cell.impl != "torch":
            record["device"] = row.get("device")
        rate = row.get("member_images_per_s")
        print(f"[{i}/{len(cells)} {time.perf_counter() - start:.0f}s] {cell.label()}: "
              + (f"{rate:,.0f} member-img/s" if rate else row["status"]), file=sys.stderr,
              flush=True)
        if args.out:
            benchlib.write_record(args.out, record)
    if record["device"] is None:  # no JAX row measured; every subprocess has ended by now
        record["device"] = benchlib.jax_device()
    batch_note = (f"batch {args.batch}/member, {args.optimizer} (lr {OPTIMIZERS[args.optimizer][0]}"
                  f"), label smoothing {args.label_smoothing}")
    print(f"# {batch_note}; device: {record['device']}; cells skipped as done: {skipped}")
    print(tables(record["rows"]))
    if args.out:
        benchlib.write_record(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
