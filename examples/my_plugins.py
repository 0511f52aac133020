"""Plug-ins of one's own, in one importable module: a dataset, a model and an unlearning
strategy with a setting. Importing the module registers them; a run that uses them records the
module's name, and every command that reopens the run (`forget`, `audit`, `report`,
`run --resume`, `fork`, `jaxunlearn.load`) imports it again.
"""

from __future__ import annotations

import flax.linen as nn
import numpy as np

from jaxunlearn import data, models
from jaxunlearn.config import setting
from jaxunlearn.strategies.approximate import Approximate
from jaxunlearn.trainer import Recipe


def blobs() -> data.Dataset:
    """Three Gaussian blobs in 8 dimensions: 600 training and 150 test feature vectors, the
    same every time (a loader must give the same data in every process)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=1.5, size=(3, 8))

    def draw(n):
        labels = rng.integers(0, 3, n)
        return (centres[labels] + rng.normal(size=(n, 8))).astype(np.float32), labels

    (x_train, y_train), (x_test, y_test) = draw(600), draw(150)
    return data.from_arrays(x_train, y_train, x_test, y_test, source="three Gaussian blobs")


class MLP(nn.Module):
    """Feature vectors -> logits: no BatchNorm, so no ``weight`` argument either."""

    num_classes: int
    hidden: int = 32

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(self.num_classes)(nn.relu(nn.Dense(self.hidden)(x)))


def mlp(num_classes: int, **_) -> MLP:
    """The model factory: called with ``num_classes``, ``stem`` and ``dtype``."""
    return MLP(num_classes)


class GradientAscent(Approximate):
    """``gradascent``: each invalid member trains ``unlearn_epochs`` more on its retained
    sample while ascending the loss of the forgotten ids it held, each with weight
    ``-ascent_weight`` (a fixed-weight cousin of NegGrad+). Approximate: its lineage keeps the
    ids, and the evaluators say how much it still remembers."""

    name = "gradascent"
    uses_forget = True
    settings = {"ascent_weight": setting(0.5, "gradascent: the weight of a forgotten example's "
                                              "ascended loss", above=0, at_most=10,
                                         unlearning=True, compare=True)}

    def recipe(self, ctx, rounds, retain, held, forget):
        return Recipe(ctx.cfg.unlearn_epochs, ctx.cfg.unlearn_lr, forget,
                      -ctx.cfg.ascent_weight)


data.register_dataset("blobs", blobs)
models.register_model("mlp", mlp)
