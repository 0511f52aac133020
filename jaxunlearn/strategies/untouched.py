"""``none``: the model keeps what it learned from deleted ids. Only a reference model (the
original study's baseline) is left so; it never trains on an id after its deletion."""

from __future__ import annotations

import numpy as np

from jaxunlearn.strategies.base import Outcome, Strategy
from jaxunlearn.trainer import Cost


class Untouched(Strategy):
    name = "none"
    exact = False
    unlearns = False
    selectable = False  # for reference models only, never the ensemble

    def unlearn(self, state, ctx, phase, ids, invalid):
        return state, Outcome(Cost(), np.ones(ctx.group.members, bool), False, 0)
