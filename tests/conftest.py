"""Shared fixtures and readers of what a run leaves on disk (its public outputs)."""

import json
import pathlib

import chex
import jax
import numpy as np
import pytest

from jaxunlearn import checkpoint, data


@pytest.fixture(scope="module")
def sample():
    return data.load_sample()


def results_of(run_dir) -> dict:
    return json.loads((pathlib.Path(run_dir) / "results.json").read_text())


def checkpoint_tree(run_dir, step: int | None = None) -> dict:
    """The state tree of checkpoint ``step`` (default: the newest) of a run folder."""
    ckpts = checkpoint.Checkpoints(run_dir, read_only=True)
    try:
        tree, _ = ckpts.load(ckpts.steps()[-1] if step is None else step)
        return tree
    finally:
        ckpts.close()


def group_state(run_dir, group: str = "ensemble", step: int | None = None) -> dict:
    """A group's stacked state (a state dict: params, batch_stats, opt_state, step, key)."""
    return checkpoint_tree(run_dir, step)["groups"][group]["state"]


def assert_same_models(a: dict, b: dict) -> None:
    """Bit-identical parameters and batch statistics (structure checked too)."""
    for part in ("params", "batch_stats"):
        chex.assert_trees_all_equal(a[part], b[part])


def rows(state: dict, mask) -> dict:
    """The members ``mask`` selects, from every leaf of a stacked state dict."""
    return jax.tree.map(lambda x: np.asarray(x)[np.asarray(mask)], state)
