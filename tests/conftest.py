"""Shared fixtures and readers of what a run leaves on disk (its public outputs).

The session shares one XLA compilation cache (a temporary folder) with every subprocess it
starts, so a killed-and-resumed run, a `forget` or a multi-device worker does not compile
again what the session compiled already. It also compiles with XLA:CPU's backend (LLVM)
optimisation off: the tests check behaviour, not speed, and most of their time is compiling,
which this halves (the programs compute the same floating-point operations). The suite runs
one test file per core with pytest-xdist (`addopts` in pyproject.toml); its workers share the
controller's cache.
"""

import os
import pathlib
import shutil
import tempfile

import chex
import jax
import numpy as np
import pytest

from jaxunlearn import checkpoint, data, records

_SHARED = "JAXUNLEARN_TEST_XLA_CACHE"
_CACHE = {"JAX_COMPILATION_CACHE_DIR": None,
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}


def pytest_configure(config):
    # Under pytest-xdist the workers share the cache the controller made (they inherit its
    # environment); only the process that made the folder removes it.
    shared = os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get(_SHARED)
    folder = shared or tempfile.mkdtemp(prefix="jaxunlearn-test-xla-")
    if not shared:
        config._jaxunlearn_cache = folder
        os.environ[_SHARED] = folder
    os.environ.update({**_CACHE, "JAX_COMPILATION_CACHE_DIR": folder,
                       "JAXUNLEARN_CACHE": os.path.join(folder, "user-cache")})
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:  # read when the backend starts
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_unconfigure(config):
    shutil.rmtree(getattr(config, "_jaxunlearn_cache", ""), ignore_errors=True)


# The test files that take longest, slowest first (from `pytest --durations=0`: the seconds each
# file's tests and fixtures took). Workers take whole files in collection order, so handing out
# the long ones first keeps both busy to the end, instead of one finishing a long file alone;
# the files not listed (a few seconds each) follow in their own order.
SLOWEST_FIRST = ("test_durability.py", "test_faults.py", "test_per_member.py",
                 "test_strategies.py", "test_plugins.py", "test_benchmarks.py",
                 "test_unlearning_methods.py", "test_sharding.py", "test_api.py",
                 "test_experiment.py", "test_examples.py", "test_privacy_trained.py",
                 "test_ensemble.py", "test_default_opt.py", "test_custom_data.py", "test_data.py",
                 "test_cli.py", "test_substacks.py", "test_pretraining.py", "test_models.py",
                 "test_sweep.py", "test_serving.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file


@pytest.fixture(scope="module")
def sample():
    return data.load_sample()


def results_of(run_dir) -> dict:
    """A run's ``results.json``, held to its declared records (`jaxunlearn.records`)."""
    results = records.load(pathlib.Path(run_dir) / "results.json")
    assert records.problems(results) == [], records.problems(results)
    return results


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
