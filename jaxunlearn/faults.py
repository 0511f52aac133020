"""Named fault-injection points, for testing durability against crashes.

Code that must survive a crash at a given moment calls ``faults.point("name")``. Normally it
does nothing. The environment variable ``JAXUNLEARN_FAULTS`` arms points, as a comma-separated
list of ``NAME`` or ``NAME@K`` (the K-th time the point is reached, counting from 1): when an
armed point is reached, the process kills itself with SIGKILL, exactly as a power cut or an
out-of-memory kill would end it. The tests use it to kill runs mid-phase and mid-checkpoint.

Points: ``phase.step`` (after an optimiser step of a phase, once its mid-phase checkpoint is
due or written), ``train.KIND.step`` (after any optimiser step of a training of that kind:
``epoch`` for a phase's, ``pretrain``, ``rewind``, ``retrain``, ``oracle``, ...),
``checkpoint.before_write``, ``checkpoint.before_manifest``, ``checkpoint.before_purge``,
``forget.before_outcome``, ``snapshot.before_digest`` (a snapshot written, its digest not
yet).
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "JAXUNLEARN_FAULTS"
_counts: dict[str, int] = {}


def _armed() -> dict[str, int]:
    spec = os.environ.get(ENV_VAR, "")
    armed = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, k = item.partition("@")
        armed[name] = int(k) if k else 1
    return armed


def point(name: str) -> None:
    """Kills this process with SIGKILL if ``name`` is armed for this occurrence."""
    if ENV_VAR not in os.environ:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _armed().get(name) == _counts[name]:
        os.kill(os.getpid(), signal.SIGKILL)
