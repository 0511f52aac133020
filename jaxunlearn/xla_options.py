"""XLA compile options for the training and scoring steps, per backend, chosen by measurement.

On XLA:CPU (jaxlib 0.10), convolutions, reductions and element-wise fusions are by default
handed to the YNNPACK library ("ynn fusions"). For the nets here that is the slow path: a
profile of one ``air-s`` training step puts most of its time in YNNPACK convolutions, slower
than XLA's own (Eigen) ones, and the step runs faster with the YNNPACK fusions off (the figures:
benchmarks/README.md, "The CPU training step"). So on CPU the steps compile with
``xla_cpu_experimental_ynn_fusion_type`` empty.

The option is experimental: a jaxlib without it (older or newer) rejects it at compile time,
so it is probed once with a tiny program and dropped where it is unknown. Set
``JAXUNLEARN_XLA_DEFAULTS=1`` to compile with XLA's defaults (to measure against them).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

# backend -> options for the steps that run convolutions (training and scoring).
STEP_OPTIONS = {"cpu": {"xla_cpu_experimental_ynn_fusion_type": ""}}


@functools.cache
def _supported(name: str, value) -> bool:
    """Whether this jaxlib's compiler for the default backend accepts ``name=value``."""
    try:
        jax.jit(lambda x: x + 1).lower(jnp.zeros(1)).compile({name: value})
    except Exception:  # noqa: BLE001 -- an unknown or ill-typed option is all this can raise
        return False
    return True


def step_compiler_options() -> dict | None:
    """The compile options for convolution steps on JAX's default backend, keeping only those
    this jaxlib knows; None where there are none (or with ``JAXUNLEARN_XLA_DEFAULTS=1``)."""
    if os.environ.get("JAXUNLEARN_XLA_DEFAULTS") == "1":
        return None
    options = {k: v for k, v in STEP_OPTIONS.get(jax.default_backend(), {}).items()
               if _supported(k, v)}
    return options or None
