"""Timings that mean what they say: wall seconds without XLA compilation.

A function compiles once per shape, whenever it first runs; `compile_seconds` sums the
process's compilation time (tracing, lowering, backend) from JAX's monitoring events, and a
`Clock` leaves it out, along with the spans it is told to pause for.
"""

from __future__ import annotations

import collections
import contextlib
import time

import jax

_compiling = [0.0]


def _on_duration(event: str, seconds: float, **kwargs) -> None:
    if event.startswith("/jax/core/compile/"):
        _compiling[0] += seconds


jax.monitoring.register_event_duration_secs_listener(_on_duration)


def compile_seconds() -> float:
    """Seconds this process has spent compiling so far."""
    return _compiling[0]


class Clock:
    """Wall seconds since creation, without compilation and without the ``paused`` spans."""

    def __init__(self):
        self.t0, self.c0, self.excluded = time.perf_counter(), compile_seconds(), 0.0

    @contextlib.contextmanager
    def paused(self):
        t0, c0 = time.perf_counter(), compile_seconds()
        try:
            yield
        finally:  # compilation inside a pause is already excluded with it
            self.excluded += time.perf_counter() - t0 - (compile_seconds() - c0)

    def seconds(self) -> float:
        return (time.perf_counter() - self.t0 - (compile_seconds() - self.c0)
                - self.excluded)


class Spans:
    """Wall seconds per named span, compilation inside it left out, summed over its
    occurrences; a span inside one of the same name is not counted twice."""

    def __init__(self):
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self._open: collections.Counter = collections.Counter()

    @contextlib.contextmanager
    def __call__(self, name: str):
        self._open[name] += 1
        clock = Clock()
        try:
            yield
        finally:
            self._open[name] -= 1
            if not self._open[name]:
                self.seconds[name] += clock.seconds()
