"""Lineage: which training examples each member's current parameters depend on.

A `Lineage` holds ``seen``: bool ``[m, n_train]``, true where example ``j`` was fed to member
``i`` in some optimiser step since the member's last (re)initialisation, and ``born``: int
``[m]``, the phase in which that initialisation happened (0 = before the first phase). It is
updated from the exact index arrays that training consumed (padding excluded), never
re-derived from a sampling plan, and it is cumulative: a member that keeps training keeps every
example it ever saw in its lineage. Only reinitialisation clears a row.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxunlearn.files import atomic_write


@dataclasses.dataclass
class Lineage:
    seen: np.ndarray  # bool [m, n_train]
    born: np.ndarray  # int32 [m]

    @classmethod
    def empty(cls, members: int, n_train: int) -> "Lineage":
        return cls(np.zeros((members, n_train), bool), np.zeros(members, np.int32))

    def record(self, idx: np.ndarray, weight: np.ndarray, active: np.ndarray | None = None) -> None:
        """Adds the examples of a batch stream: ``idx`` int ``[..., m, b]``, ``weight`` same shape
        (0 marks padding), ``active`` bool ``[m]`` (inactive members were not updated)."""
        idx = np.asarray(idx)
        fed = np.asarray(weight) != 0  # negative: trained on by gradient ascent
        if active is not None:
            fed = fed & np.asarray(active, bool)[:, None]
        m = self.seen.shape[0]
        idx = np.moveaxis(idx, -2, 0).reshape(m, -1)
        fed = np.moveaxis(fed, -2, 0).reshape(m, -1)
        for i in range(m):
            self.seen[i, idx[i][fed[i]]] = True

    def reset(self, mask: np.ndarray, phase: int) -> None:
        """Clears the rows of reinitialised members (bool ``[m]``) and notes their birth phase."""
        mask = np.asarray(mask, bool)
        self.seen[mask] = False
        self.born[mask] = phase

    def invalid(self, deleted_ids) -> np.ndarray:
        """bool ``[m]``: members whose lineage holds any of ``deleted_ids``."""
        ids = np.asarray(deleted_ids, dtype=np.int64)
        if ids.size == 0:
            return np.zeros(self.seen.shape[0], bool)
        return self.seen[:, ids].any(axis=1)

    def violations(self, deleted_ids) -> int:
        """Number of (member, deleted id) pairs still in a lineage: 0 when unlearning is exact."""
        ids = np.asarray(deleted_ids, dtype=np.int64)
        return int(self.seen[:, ids].sum()) if ids.size else 0

    def save(self, path, deleted_ids) -> None:
        """Writes ``lineage.npz``: ``lineage`` bool ``[m, n]``, ``born`` and ``deleted`` ids."""
        atomic_write(path, lambda f: np.savez_compressed(
            f, lineage=self.seen, born=self.born,
            deleted=np.asarray(sorted(deleted_ids), np.int64)))
