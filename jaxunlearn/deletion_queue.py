"""Deletion requests as a run applies them: their typed sources, and the queue.

A request has a typed `Source`: scheduled after phase P, asked with `jaxunlearn forget`, or
re-applied after a fall-back to a checkpoint that predates it. The deletion log
(``deletions.sqlite``) stores a source as its text (`str`), `parse_source` reads it back.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator, NamedTuple, Union

import jax
import numpy as np

from jaxunlearn import deletion_log


@dataclasses.dataclass(frozen=True)
class Scheduled:
    """The deletion schedule's ids after a phase."""

    phase: int

    def __str__(self) -> str:
        return f"schedule (after phase {self.phase})"


@dataclasses.dataclass(frozen=True)
class Forget:
    """A `forget` request."""

    via: str = "command"

    def __str__(self) -> str:
        return f"forget ({self.via})"


@dataclasses.dataclass(frozen=True)
class Reapplied:
    """Logged deletions applied again after falling back to a checkpoint that predates them."""

    checkpoint: int

    def __str__(self) -> str:
        return f"re-applied after falling back to checkpoint {self.checkpoint}"


Source = Union[Scheduled, Forget, Reapplied]
_PATTERNS = ((Scheduled, r"schedule \(after phase (\d+)\)", int),
             (Forget, r"forget \((.*)\)", str),
             (Reapplied, r"re-applied after falling back to checkpoint (\d+)", int))


def parse_source(text: str) -> Source | None:
    """The source a log entry's text names (None for text no version of jaxunlearn wrote)."""
    for kind, pattern, convert in _PATTERNS:
        match = re.fullmatch(pattern, text)
        if match:
            return kind(convert(match.group(1)))
    return None


class Request(NamedTuple):
    """A deletion request: its number in the deletion log (None when not logged), ids,
    source, and its identity in the log (`deletion_log.request_key`; None when not logged)."""

    id: int | None
    ids: np.ndarray
    source: Source
    key: str | None = None


class Queue:
    """The requests a run applies, in order: the schedule's after each phase, then the `forget`
    requests pending in the deletion log (single process only: other processes cannot read the
    log)."""

    def __init__(self, log: deletion_log.DeletionLog | None, deletions):
        self.log, self.deletions = log, deletions

    def record(self, ids: np.ndarray, source: Source) -> Request:
        """Logs a request before it is applied; one left pending by a killed process for the
        same ids and source (or applied before a fall-back) is reused."""
        if self.log is None:
            return Request(None, ids, source)
        for known in self.log.records():
            if parse_source(known["source"]) == source and known["ids"] == ids.tolist():
                return Request(known["id"], ids, source, known["key"])
        request_id = self.log.request(ids.tolist(), str(source))
        return Request(request_id, ids, source, self.log.key(request_id))

    def scheduled(self, phase: int) -> Request:
        """The scheduled deletion after ``phase`` (logged when it deletes something)."""
        ids = self.deletions.scheduled_after(phase)
        source = Scheduled(phase)
        return self.record(ids, source) if ids.size else Request(None, ids, source)

    def close(self, disk) -> list[Request]:
        """The `forget` requests pending, or, when there are none, the run's word that it
        takes no more (``disk.take_requests(False)``), in one log transaction: a `forget`
        that records its request in the log and reads the holder's word in one transaction
        too is either seen here or knows that it must apply the request itself."""
        if self.log is None or jax.process_count() > 1:
            return []
        with self.log.transaction():
            pending = list(self.forgets())
            if not pending and disk.held is not None:
                disk.held.update(takes_requests=False)
        return pending

    def forgets(self) -> Iterator[Request]:
        """`forget` requests pending in the log that the run has not applied."""
        if self.log is None or jax.process_count() > 1:
            return
        for entry in self.log.pending():
            source = parse_source(entry["source"])
            if isinstance(source, Forget) and entry["key"] not in self.deletions.applied:
                yield Request(entry["id"], np.asarray(entry["ids"], np.int64), source,
                              entry["key"])
