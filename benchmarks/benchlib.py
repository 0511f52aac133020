"""Helpers shared by the benchmark scripts: timing, memory, failures, versions, JSON and tables.

Not a script. `throughput.py`, `unlearn_latency.py` and `torch_reference.py` import it as a
sibling module (run them as ``python benchmarks/NAME.py``, which puts this folder on the path).
Nothing here imports an accelerator library at module level, so a parent process that only
spawns measurement subprocesses never claims the device.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import pathlib
import platform
import resource
import shlex
import signal
import statistics
import sys
import threading
import time
from typing import Callable, Sequence

PACKAGES = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "optax", "numpy",
            "torch")


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def versions(packages: Sequence[str] = PACKAGES) -> dict:
    """Installed versions (from package metadata, without importing), None where missing."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def command_line(script: str, argv: Sequence[str]) -> str:
    return shlex.join(["python", f"benchmarks/{script}", *argv])


def jax_device() -> dict:
    """The default JAX device (initialises the JAX backend)."""
    import jax

    device = jax.devices()[0]
    return {"platform": device.platform, "kind": device.device_kind, "count": jax.device_count()}


def host_peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def jax_peak_memory() -> dict:
    """Peak memory of this process: the device allocator's peak where the backend reports one
    (GPU), else the host's peak RSS (CPU). Neither can be reset, so it covers the process."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return {"peak_bytes": int(stats["peak_bytes_in_use"]), "peak_memory": "device"}
    return {"peak_bytes": host_peak_rss_bytes(), "peak_memory": "host RSS"}


def xla_bytes(compiled) -> int | None:
    """Device memory XLA plans for one call of a compiled program: arguments + outputs +
    temporaries - donated (aliased) buffers. Per program, so valid in a shared process."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def compile_timed(jitted, *args):
    """Ahead-of-time compile ``jitted`` for ``args``: ``(compiled, seconds, xla bytes)``."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0, xla_bytes(compiled)


def resident_data(n: int, seed: int = 0):
    """Synthetic uint8 images ``[n, 32, 32, 3]`` and int32 labels, on the JAX device."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)),
            jnp.asarray(rng.integers(0, 10, n), jnp.int32))


def time_calls(call: Callable, state, steps: int, block: Callable) -> tuple:
    """Runs ``state, out = call(state)`` once to warm up, then ``steps`` timed times.

    ``block(out)`` waits for the device. Returns ``(state, first_call_s, [seconds per call])``.
    """
    t0 = time.perf_counter()
    state, out = call(state)
    block(out)
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, out = call(state)
        block(out)
        times.append(time.perf_counter() - t0)
    return state, first, times


def step_stats(times: Sequence[float], images_per_step: int) -> dict:
    """Median and min-max of step times, and the throughput they give (images per second)."""
    median = statistics.median(times)
    return {"step_s_median": median, "step_s_min": min(times), "step_s_max": max(times),
            "member_images_per_s": images_per_step / median,
            "member_images_per_s_min": images_per_step / max(times),
            "member_images_per_s_max": images_per_step / min(times)}


def is_oom(message: str) -> bool:
    text = message.lower()
    return "resource_exhausted" in text or "out of memory" in text


def failure_status(exc: BaseException) -> str:
    """``OOM`` for an out-of-memory failure, else ``error: Type: first line``."""
    message = str(exc)
    if is_oom(message):
        return "OOM"
    first = message.strip().splitlines()[0] if message.strip() else ""
    return f"error: {type(exc).__name__}: {first[:300]}"


def write_record(path: str | pathlib.Path, record: dict) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_range(median: float, low: float, high: float, digits: int) -> str:
    return f"{median:,.{digits}f} ({low:,.{digits}f}-{high:,.{digits}f})"


def fmt_gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


@contextlib.contextmanager
def sigterm_exits():
    """Within the block, SIGTERM (as sent by ``timeout``) raises SystemExit, so ``finally``
    blocks run and `subprocess.run` kills its child. Restores the old handler afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
