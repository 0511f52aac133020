"""Sub-ensemble execution: retraining some members runs them as a stack of their own."""

import chex
import jax
import numpy as np
import pytest

from jaxunlearn import config, ensemble
from jaxunlearn.group import ModelGroup
from jaxunlearn.stages import Stage
from jaxunlearn.trainer import Trainer

M = 4


@pytest.mark.parametrize("policy", ["pow2", "ones", "exact"])
@pytest.mark.parametrize("multiple", [1, 2])
def test_substacks_cover_the_chosen_members_once(policy, multiple):
    rng = np.random.default_rng(0)
    for _ in range(50):
        m = multiple * int(rng.integers(1, 5))
        chosen = rng.random(m) < 0.5
        stacks = ensemble.substacks(chosen, multiple, policy)
        if not chosen.any():
            assert stacks == []
            continue
        flat = np.concatenate(stacks)
        assert len(flat) == len(set(flat.tolist()))  # distinct members: scatter is exact
        assert sorted(flat[chosen[flat]].tolist()) == np.flatnonzero(chosen).tolist()
        assert all(len(s) % multiple == 0 for s in stacks)
        if chosen.all():
            assert [s.tolist() for s in stacks] == [list(range(m))]
        elif policy == "pow2":  # distinct powers of two, padded by less than one unit
            units = [len(s) // multiple for s in stacks]
            assert len(set(units)) == len(units) and all(u & (u - 1) == 0 for u in units)
            assert sum(units) == -(-chosen.sum() // multiple)


def _train(layout, policy, chosen, sample):
    cfg = config.apply_overrides(config.get_preset("smoke"), {
        "members": M, "model": "tiny", "stem": "cifar", "member_parallel": layout,
        "substacks": policy, "batch_size": 8, "epochs": 2, "eval_every_epoch": False,
        "optimizer": "sgd", "learning_rate": 0.05})
    ds = sample.limit(64, 8)
    group = ModelGroup("ensemble", "ensemble", "tiny", M, cfg, jax.random.PRNGKey(0),
                       (ds.train_images, ds.train_labels, ds.test_images, ds.test_labels))
    before = jax.tree.map(np.asarray, group.state)
    stage = Stage("ensemble", 1, 1, 1, 1, [np.arange(i * 16, i * 16 + 12) for i in range(M)],
                  None)
    cost = Trainer(cfg, np.zeros(64, bool)).train(group, stage, chosen)
    return group, before, cost


@pytest.mark.parametrize("layout", ["vmap", "unroll"])
def test_training_some_members_leaves_the_others_bit_identical(layout, sample):
    chosen = np.array([False, True, False, True])
    group, before, cost = _train(layout, "pow2", chosen, sample)
    after = jax.tree.map(np.asarray, group.state)
    for i in np.flatnonzero(~chosen):
        chex.assert_trees_all_equal(jax.tree.map(lambda x: x[i], after),
                                    jax.tree.map(lambda x: x[i], before))
    for i in np.flatnonzero(chosen):
        assert int(after.step[i]) == 2 * 2  # 12 examples, batch 8: 2 steps x 2 epochs
    assert cost.member_epochs == 2 * 2 and cost.member_examples == 2 * 12 * 2
    assert group.lineage.seen[~chosen].sum() == 0 and group.lineage.seen[chosen].sum() == 24


@pytest.mark.parametrize("layout, exact", [("vmap", False), ("unroll", True)])
def test_a_sub_stack_trains_members_as_the_whole_stack_does(layout, exact, sample):
    """vmap's grouped convolutions round differently with the stack size; unroll computes each
    member alone, bit for bit. (With XLA's own convolutions, which the steps compile to on CPU
    (`jaxunlearn.xla_options`), the stack of four runs its grouped convolutions in another
    order than stacks of two and one, which equal `unroll` bit for bit: 3.0e-5 apart after
    four steps on kernel entries of ~3e-3, where YNNPACK's were 1e-7 apart; the absolute
    tolerance is 5e-5, was 1e-5.)"""
    chosen = np.array([True, False, True, True])
    whole, _, _ = _train(layout, "full", chosen, sample)  # the stacked step, others masked
    for policy in ("pow2", "ones"):
        sub, _, _ = _train(layout, policy, chosen, sample)
        got, want = (jax.tree.map(lambda x: np.asarray(x)[chosen], g.state.params)
                     for g in (sub, whole))
        if exact:
            chex.assert_trees_all_equal(got, want)
        else:
            chex.assert_trees_all_close(got, want, rtol=1e-4, atol=5e-5)


def test_unroll_agrees_with_vmap_map_and_a_python_loop_on_logits(sample):
    from jaxunlearn import steps
    from jaxunlearn.models import make_model

    model, tx = make_model("tiny", "cifar"), steps.make_optimizer("sgd", 0.1)
    state = jax.jit(ensemble.init_ensemble, static_argnums=(0, 1, 3))(
        model, tx, jax.random.PRNGKey(0), M)
    images = jax.numpy.asarray(sample.train_images[:32])
    idx = jax.numpy.arange(16, dtype=jax.numpy.int32)
    out = {s: jax.jit(ensemble.make_eval_logits(model, s))(state, images, idx)
           for s in ensemble.LAYOUTS}
    loop = np.stack([jax.jit(steps.eval_logits, static_argnums=0)(
        model, jax.tree.map(lambda x: x[i], state), images, idx) for i in range(M)])
    np.testing.assert_array_equal(out["unroll"], loop)  # each member computed alone
    for s in ("vmap", "map"):
        np.testing.assert_allclose(out[s], loop, rtol=1e-4, atol=1e-5)
