import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunlearn import ensemble, steps
from jaxunlearn.group import setup_compiler_options
from jaxunlearn.models import make_model
from jaxunlearn.reinit import make_reinit

M, N, B = 4, 64, 8


# Initialisation-like programs compile at XLA:CPU level 0 here (see setup_compiler_options):
# the laws tested do not depend on backend optimisation, and the suite stays fast.
def _init(model, tx, key):
    return jax.jit(ensemble.init_ensemble, static_argnums=(0, 1, 3),
                   compiler_options=setup_compiler_options())(model, tx, key, M)


@pytest.fixture(scope="module")
def setup():
    model = make_model("tiny", "cifar")
    tx = steps.make_optimizer("adam", 1e-2)
    state = _init(model, tx, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (N, 32, 32, 3), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, 10, N), jnp.int32)
    return model, tx, state, images, labels


def _batch(seed, pad=0):
    rng = np.random.default_rng(seed)
    idx = jnp.asarray(rng.integers(0, N, (M, B)), jnp.int32)
    weight = jnp.ones((M, B), jnp.float32).at[:, B - pad:].set(0.0) if pad else jnp.ones((M, B))
    return idx, weight


def _assert_trees_equal(a, b):
    chex.assert_trees_all_equal(a, b)  # structure, shapes, dtypes and values


def test_member_axis_first_on_every_leaf(setup):
    _, _, state, _, _ = setup
    leaves = jax.tree.leaves(state)
    assert {leaf.shape[0] for leaf in leaves} == {M}
    assert state.params and state.batch_stats and state.opt_state is not None
    assert state.step.shape == (M,) and state.key.shape[0] == M


def test_members_are_initialised_differently(setup):
    _, _, state, _, _ = setup
    kernel = state.params["fc"]["kernel"]
    assert not np.allclose(kernel[0], kernel[1])


def test_layouts_and_python_loop_agree(setup):
    # SGD keeps the comparison linear in the gradients; Adam's first step, lr * g / (|g| + eps),
    # turns float reassociation noise in near-zero gradients into visible differences.
    model, _, _, images, labels = setup
    tx = steps.make_optimizer("sgd", 0.1)
    state = _init(model, tx, jax.random.PRNGKey(0))
    idx, weight = _batch(1, pad=3)
    active = jnp.ones(M, bool)
    outs = {}
    for layout in ensemble.LAYOUTS + ("hybrid:2",):
        step = jax.jit(ensemble.make_train_step(model, tx, layout))
        outs[layout] = step(state, images, labels, idx, weight, active)
    single = jax.jit(functools.partial(steps.train_step, model, tx, False))
    looped = [single(jax.tree.map(lambda x: x[i], state), images, labels, idx[i], weight[i],
                     active[i]) for i in range(M)]
    loop_state = jax.tree.map(lambda *xs: jnp.stack(xs), *[s for s, _ in looped])
    loop_loss = jnp.stack([loss for _, loss in looped])
    for layout, (new_state, loss) in outs.items():
        chex.assert_trees_all_close(new_state, loop_state, rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(loss, loop_loss, rtol=1e-5)
    # The update really moved the parameters.
    assert not np.allclose(outs["map"][0].params["fc"]["kernel"], state.params["fc"]["kernel"])


def test_inactive_member_is_untouched(setup):
    model, tx, state, images, labels = setup
    idx, weight = _batch(2)
    active = jnp.array([True, False, True, True])
    new, loss = jax.jit(ensemble.make_train_step(model, tx, "map"))(state, images, labels, idx,
                                                                   weight, active)
    _assert_trees_equal(jax.tree.map(lambda x: x[1], new), jax.tree.map(lambda x: x[1], state))
    assert float(loss[1]) == 0.0 and int(new.step[0]) == 1 and int(new.step[1]) == 0


def test_train_step_compiles_once_for_any_batch_content(setup):
    model, tx, state, images, labels = setup
    step = jax.jit(chex.assert_max_traces(ensemble.make_train_step(model, tx, "map"), n=1))
    for seed, pad in ((3, 0), (4, 5), (5, B)):  # full, padded, and all-padding batches
        idx, weight = _batch(seed, pad)
        state, _ = step(state, images, labels, idx, weight, jnp.ones(M, bool))


def test_eval_logits_shape_and_strategies_agree(setup):
    model, _, state, images, _ = setup
    idx = jnp.arange(10, dtype=jnp.int32)
    out = {s: jax.jit(ensemble.make_eval_logits(model, s))(state, images, idx)
           for s in ensemble.LAYOUTS}
    assert out["map"].shape == (M, 10, 10)
    np.testing.assert_allclose(out["map"], out["vmap"], rtol=1e-4, atol=1e-5)


def test_resolve_layout():
    assert ensemble.resolve_layout("auto", "cpu") == "vmap"  # ResNet-18, ImageNet stem
    assert ensemble.resolve_layout("auto", "cpu", "resnet18", "cifar") == "unroll"
    assert ensemble.resolve_layout("auto", "cpu", "tiny", "imagenet") == "unroll"
    assert ensemble.resolve_layout("auto", "gpu") == "map"
    assert ensemble.resolve_layout("auto", "cpu", "resnet50", "cifar") == "unroll"  # stem's
    assert ensemble.resolve_layout("auto", "cpu", "air-m", "cifar") == "unroll"  # family
    assert ensemble.resolve_layout("hybrid:2") == "hybrid:2"
    for bad in ("pmap", "hybrid", "hybrid:0", "hybrid:x"):
        with pytest.raises(ValueError, match="unknown member_parallel"):
            ensemble.resolve_layout(bad)


def test_hybrid_needs_a_divisible_member_count(setup):
    with pytest.raises(ValueError, match="divisible by 3"):
        ensemble.over_members("hybrid:3", lambda x: x, (jnp.zeros((M, 2)),))


# --- unlearning ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(setup):
    model, tx, state, images, labels = setup
    step = jax.jit(ensemble.make_train_step(model, tx, "map"))
    for seed in range(3):
        idx, weight = _batch(10 + seed)
        state, _ = step(state, images, labels, idx, weight, jnp.ones(M, bool))
    return model, tx, state


@pytest.fixture(scope="module")
def unlearn(trained):
    model, tx, _ = trained
    return jax.jit(make_reinit(model, tx), compiler_options=setup_compiler_options())


def test_all_false_mask_changes_nothing(trained, unlearn):
    _, _, state = trained
    out = unlearn(jax.random.PRNGKey(7), state, jnp.zeros(M, bool))
    _assert_trees_equal(out, state)


def test_unmasked_members_bit_identical_and_masked_fresh(trained, unlearn):
    model, tx, state = trained
    invalid = jnp.array([False, True, False, False])
    out = unlearn(jax.random.PRNGKey(7), state, invalid)
    for i in (0, 2, 3):
        _assert_trees_equal(jax.tree.map(lambda x: x[i], out), jax.tree.map(lambda x: x[i], state))
    # A fresh member from its own key (jit and vmap may round the initialisers differently).
    fresh = jax.jit(steps.init_member, static_argnums=(0, 1),
                    compiler_options=setup_compiler_options())(
        model, tx, jax.random.split(jax.random.PRNGKey(7), M)[1])
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[1], out), fresh, rtol=1e-5, atol=1e-6)
    assert int(out.step[1]) == 0 and int(state.step[1]) == 3


def test_unlearn_twice_equals_once(trained, unlearn):
    _, _, state = trained
    key, invalid = jax.random.PRNGKey(3), jnp.array([True, False, True, False])
    once = unlearn(key, state, invalid)
    _assert_trees_equal(unlearn(key, once, invalid), once)


def test_new_mask_does_not_recompile(trained):
    model, tx, state = trained
    unlearn = jax.jit(chex.assert_max_traces(make_reinit(model, tx), n=1),
                      compiler_options=setup_compiler_options())
    for k, mask in enumerate(([True, False, False, False], [False, True, True, True], [False] * 4)):
        unlearn(jax.random.PRNGKey(k), state, jnp.array(mask))
