"""Deletion schedules: the original study's random deletions, or an explicit JSON schedule.

`Deletions` holds a run's deletions: the deleted ids, the schedule, and what each applied
request did (for the deletion log).

A schedule maps a phase number (1-based) to the example ids deleted **after** that phase.
An explicit schedule is a JSON object such as ``{"1": [12, 345], "3": [7]}``; it is checked
in full before any training starts.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from jaxunlearn import plans


class ScheduleError(ValueError):
    """A deletion schedule that cannot be applied; the message says what to fix."""


def load_schedule(path) -> dict[int, list[int]]:
    """Reads an explicit schedule file (JSON object: phase -> list of example ids)."""
    path = pathlib.Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ScheduleError(f"deletion schedule {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ScheduleError(f"deletion schedule {path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ScheduleError(f"deletion schedule {path} must be a JSON object mapping a phase "
                            'number to a list of example ids, e.g. {"1": [12, 345]}')
    schedule: dict[int, list[int]] = {}
    for phase, ids in raw.items():
        try:
            p = int(phase)
        except ValueError:
            raise ScheduleError(f"{path}: phase {phase!r} is not an integer") from None
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                for i in ids):
            raise ScheduleError(f"{path}: phase {p} must map to a list of integer example ids")
        schedule[p] = list(ids)
    return schedule


def validate_schedule(schedule: dict[int, list[int]], chunks: list[np.ndarray]) -> None:
    """Checks an explicit schedule against the data before training starts.

    Every phase must exist; every id must be in that phase's working set (arrived and not
    deleted earlier); no id may repeat; no deletion may empty the working set.
    """
    phases = len(chunks)
    n_train = int(sum(len(c) for c in chunks))
    deleted: set[int] = set()
    for p in sorted(schedule):
        ids = schedule[p]
        if not 1 <= p <= phases:
            raise ScheduleError(f"deletions scheduled after phase {p}, but the run has phases 1..{phases}")
        arrived = int(sum(len(c) for c in chunks[:p]))
        seen: set[int] = set()
        for i in ids:
            if not 0 <= i < n_train:
                raise ScheduleError(f"example id {i} (after phase {p}) does not exist or "
                                    f"cannot be deleted: deletable ids are 0..{n_train - 1}")
            if i >= arrived:
                raise ScheduleError(f"example id {i} cannot be deleted after phase {p}: only ids "
                                    f"0..{arrived - 1} have arrived by then")
            if i in seen:
                raise ScheduleError(f"example id {i} is listed twice after phase {p}")
            if i in deleted:
                raise ScheduleError(f"example id {i} (after phase {p}) was already deleted in an earlier phase")
            seen.add(i)
        deleted |= seen
        if len(deleted) >= arrived:
            raise ScheduleError(f"the deletions after phase {p} remove every example of the working set")


def random_deletions(rng: np.random.Generator, working: np.ndarray, rate: float,
                     arrived: int) -> np.ndarray:
    """The original study's schedule: ``int(rate * arrived)`` random ids of the live working set,
    where ``arrived`` counts every example of the chunks so far (deleted ones included), which
    gives the original's 1, 2, 3, 4 deletions after phases 1-4 of 10,000-example chunks."""
    count = min(int(rate * arrived + 1e-9), len(working) - 1)
    if count == 0:
        return np.zeros(0, np.int64)
    return np.sort(rng.choice(working, size=count, replace=False)).astype(np.int64)


class Deletions:
    """A run's deletions: the deleted ids (a bool mask, and the ids in deletion order), the
    schedule of deletions after each phase (explicit, or the original study's random one), and
    the outcome of each applied request, until the deletion log records it."""

    def __init__(self, seed: int, rate: float, chunks: list[np.ndarray],
                 schedule: dict[int, list[int]] | None, n_train: int | None = None):
        """``n_train``: the training examples, the chunks' and any never deletable (the
        chunks' alone when None)."""
        n_train = int(sum(len(c) for c in chunks)) if n_train is None else n_train
        self.chunks, self.rate, self.schedule = chunks, rate, schedule
        self.mask = np.zeros(n_train, bool)  # shared with the trainer: updated in place
        self.ids: list[int] = []
        self.rng = plans.stream(seed, "deletions")
        # The identity of each logged request applied (`deletion_log.request_key`) -> its
        # outcome: the checkpoints hold it, and opening a run checks the log against it.
        self.applied: dict[str, dict] = {}

    def scheduled_after(self, phase: int) -> np.ndarray:
        """The ids to delete after ``phase`` (of ``phases``): from the explicit schedule (minus
        ids a request deleted already), or drawn at random; none after the last phase."""
        if self.schedule is not None:
            ids = np.asarray(sorted(self.schedule.get(phase, [])), np.int64)
            return ids[~self.mask[ids]]
        if phase == len(self.chunks):
            return np.zeros(0, np.int64)
        return random_deletions(self.rng, plans.working_set(self.chunks, phase, self.mask),
                                self.rate, arrived=sum(len(c) for c in self.chunks[:phase]))

    def mark(self, ids) -> None:
        ids = [int(i) for i in ids]
        self.mask[ids] = True
        self.ids.extend(ids)

    def sorted_ids(self) -> np.ndarray:
        return np.asarray(sorted(self.ids), np.int64)

    def state_dict(self) -> dict:
        return {"ids": list(self.ids), "rng": self.rng.bit_generator.state,
                "applied": dict(self.applied)}

    def load_state_dict(self, state: dict) -> None:
        self.ids = []
        self.mask[:] = False
        self.mark(state["ids"])
        self.rng.bit_generator.state = state["rng"]
        self.applied = {str(k): v for k, v in state["applied"].items()}
