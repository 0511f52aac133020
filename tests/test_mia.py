import json

import numpy as np
import pytest

from jaxunlearn import mia

ATTACKS = ("logistic", "threshold")


def test_auc_extremes_and_ties():
    labels = np.array([0, 0, 1, 1])
    assert mia.auc(np.array([0.1, 0.2, 0.8, 0.9]), labels) == 1.0
    assert mia.auc(np.array([0.9, 0.8, 0.2, 0.1]), labels) == 0.0
    assert mia.auc(np.full(4, 3.0), labels) == 0.5


def test_auc_hand_computed():
    # Pairs (member, non-member): 0.35 > 0.1, 0.35 < 0.4, 0.8 > both -> 3 / 4.
    assert mia.auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    # Members {2, 3} vs non-members {1, 2}: 2>1, 2=2 (half), 3>1, 3>2 -> 3.5 / 4.
    assert mia.auc(np.array([1.0, 2.0, 2.0, 3.0]), np.array([0, 1, 0, 1])) == 0.875


def test_auc_empty_class_raises():
    with pytest.raises(ValueError, match="both classes"):
        mia.auc(np.array([0.1, 0.2]), np.array([1, 1]))
    with pytest.raises(ValueError, match="both classes"):
        mia.auc(np.array([]), np.array([]))


def test_per_example_loss():
    log_probs = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]))
    out = mia.per_example_loss(log_probs, np.array([0, 2]))
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, [-np.log(0.5), -np.log(0.1)])


def test_same_distribution_is_chance():
    rng = np.random.default_rng(0)
    out = mia.loss_attack(rng.exponential(size=500), rng.exponential(size=500), seed=0)
    assert out["n"] == 500 and out["folds"] == 5
    for name in ATTACKS:
        assert abs(out[name]["accuracy"] - 0.5) < 0.08, out[name]
        assert abs(out[name]["auc"] - 0.5) < 0.08, out[name]


def test_memorised_set_is_exposed():
    rng = np.random.default_rng(0)
    out = mia.loss_attack(0.01 * rng.exponential(size=500), rng.exponential(size=500), seed=0)
    for name in ATTACKS:
        assert out[name]["accuracy"] > 0.9, out[name]
        assert out[name]["auc"] > 0.95, out[name]


def test_layout_balancing_and_json():
    rng = np.random.default_rng(1)
    out = mia.loss_attack(0.5 * rng.exponential(size=37), rng.exponential(size=120), folds=4,
                          seed=3)
    assert out["n"] == 37 and out["folds"] == 4
    assert set(out) == {"n", "folds", "logistic", "threshold"}
    for name in ATTACKS:
        res = out[name]
        assert set(res) == {"accuracy", "accuracy_std", "auc", "auc_std", "per_fold"}
        for key in ("accuracy", "accuracy_std", "auc", "auc_std"):
            assert isinstance(res[key], float) and np.isfinite(res[key])
        for key in ("accuracy", "auc"):
            vals = res["per_fold"][key]
            assert len(vals) == 4 and all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in vals)
            assert res[key] == pytest.approx(np.mean(vals))
            assert res[key + "_std"] == pytest.approx(np.std(vals))
    assert json.loads(json.dumps(out)) == out


def test_folds_clamped_to_n():
    out = mia.loss_attack(np.array([0.1, 0.2, 0.3]), np.array([1.0, 2.0, 3.0, 4.0]), folds=10)
    assert out["n"] == 3 and out["folds"] == 3
    assert out["threshold"]["accuracy"] == 1.0 and out["threshold"]["auc"] == 1.0
    assert out["logistic"]["accuracy"] == 1.0 and out["logistic"]["auc"] == 1.0
    assert mia.loss_attack(np.array([0.1, 0.2]), np.array([1.0, 2.0]), folds=1)["folds"] == 2


def test_too_few_examples_skipped():
    for mem, non in (([0.1], [1.0, 2.0]), ([], [1.0]), ([], [])):
        out = mia.loss_attack(np.array(mem), np.array(non))
        skipped = "need at least 2 examples per class"
        assert out == {"n": min(len(mem), len(non)), "skipped": skipped}


def test_constant_losses_are_chance():
    out = mia.loss_attack(np.ones(20), np.ones(20))
    for name in ATTACKS:
        assert out[name]["auc"] == 0.5 and out[name]["accuracy"] == 0.5


def test_deterministic():
    rng = np.random.default_rng(2)
    mem, non = 0.3 * rng.exponential(size=80), rng.exponential(size=200)
    assert mia.loss_attack(mem, non, seed=7) == mia.loss_attack(mem, non, seed=7)
