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
            assert len(vals) == 4 and all(isinstance(v, float) for v in vals)
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


# LiRA (per-example, offline) -----------------------------------------------------------------

def _planted(rng, n=2000, k=16, shift=2.0, spread=3.0, noise=0.5, planted=True):
    """Synthetic confidences in LiRA's setting: each example has its own difficulty (the
    population attack's nuisance, N(0, spread) across examples), each model adds noise, and a
    model that trained on an example is ``shift`` more confident on it. Half the examples are
    members of the target model (when ``planted``); none is a member of a reference model."""
    difficulty = rng.normal(0.0, spread, n)
    members = np.zeros(n, bool)
    members[: n // 2] = planted
    pool = difficulty + rng.normal(0.0, noise, (k, n))
    target = difficulty + rng.normal(0.0, noise, n) + shift * members
    out = np.ones((1, k, n), bool)
    return target[None], pool[None], out, members


def test_lira_beats_the_population_attack_on_a_planted_memorised_set():
    rng = np.random.default_rng(0)
    target, pool, out, members = _planted(rng)
    scores = mia.lira_scores(target, pool, out)
    got = mia.lira_attack(scores[members], scores[~members])
    population = mia.loss_attack(-target[0][members], -target[0][~members])  # loss ~ -confidence
    assert got["auc"] > 0.9 and got["tpr_at_1pct_fpr"] > 0.3
    assert population["logistic"]["auc"] < 0.75
    assert got["auc"] > population["logistic"]["auc"] + 0.2
    # the population attack's best threshold catches almost nothing at 1% false positives
    assert mia.tpr_at_fpr(target[0], members.astype(int), 0.01) < 0.1


def test_lira_is_chance_on_two_samples_of_one_distribution():
    rng = np.random.default_rng(1)
    target, pool, out, members = _planted(rng, n=4000, planted=False)
    members[: len(members) // 2] = True  # labels only: nothing was trained on
    scores = mia.lira_scores(target, pool, out)
    got = mia.lira_attack(scores[members], scores[~members], folds=5)
    assert abs(got["auc"] - 0.5) < 0.04 and got["tpr_at_1pct_fpr"] < 0.03
    assert got["folds"] == 5 and got["auc_std"] < 0.05


def test_lira_uses_only_the_allowed_reference_models():
    # Example 0's only out-model disagrees wildly with the in-model: masking it must matter.
    target = np.array([[1.0, 1.0]])
    pool = np.array([[[0.0, 0.0], [50.0, 50.0]]])
    out = np.array([[[True, True], [False, True]]])
    scores = mia.lira_scores(target, pool, out)
    assert scores[0] > 0 > scores[1]
    # no out-model at all: no score
    assert np.isnan(mia.lira_scores(target, pool, np.zeros_like(out)))[0]


def test_logit_confidence_matches_its_definition():
    logits = np.array([[[2.0, 0.5, -1.0], [0.0, 0.0, 0.0]]])
    labels = np.array([0, 2])
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    want = np.log(p[0, [0, 1], labels]) - np.log(1 - p[0, [0, 1], labels])
    np.testing.assert_allclose(mia.logit_confidence(logits, labels)[0], want, rtol=1e-12)
    big = mia.logit_confidence(np.array([[[400.0, 0.0]]]), np.array([0]))
    assert np.isfinite(big).all() and big[0, 0] == pytest.approx(400.0)


def test_tpr_at_fpr_hand_computed():
    scores = np.array([10.0, 9.0, 1.0, 8.0, 2.0, 3.0, 0.0])
    labels = np.array([1, 1, 1, 0, 0, 0, 0])
    # no false positive allowed: threshold at the top negative (8): two members above it
    assert mia.tpr_at_fpr(scores, labels, 0.0) == pytest.approx(2 / 3)
    assert mia.tpr_at_fpr(scores, labels, 0.25) == pytest.approx(2 / 3)  # one allowed: 3
    assert mia.tpr_at_fpr(scores, labels, 0.5) == pytest.approx(2 / 3)   # two: 2
    assert mia.tpr_at_fpr(scores, labels, 1.0) == pytest.approx(1.0)


# Online LiRA --------------------------------------------------------------------------------


def _planted_online(seed=0, m=16, n=300, gap=2.0, noise=0.5):
    """Confidences of m models on n examples, each in about half of them: trained on an example,
    a model is ``gap`` (per example, up to 2x) more confident."""
    rng = np.random.default_rng(seed)
    held = rng.random((m, n)) < 0.5
    base, gaps = rng.normal(0, 2, n), rng.uniform(0.5, 1.0, n) * gap
    conf = base[None] + gaps[None] * held + rng.normal(0, noise, (m, n))
    columns = np.broadcast_to(np.arange(n), (m, n))
    return rng, held, base, conf, columns


def test_online_lira_has_power_on_a_planted_memorised_set_and_is_chance_without_it():
    rng, held, base, conf, columns = _planted_online()
    scores = mia.online_lira_scores(conf, conf, held)
    got = mia.grouped_attack(scores[held], columns[held], scores[~held], columns[~held])
    assert got["auc"] > 0.95 and got["tpr_at_1pct_fpr"] > 0.5
    assert got["n"] == 300 and got["pairs"] == held.sum() and got["folds"] == 5
    # "Unlearned" models that never trained on any example: their held pairs score like the
    # non-members against the same references.
    unseen = base[None] + rng.normal(0, 0.5, conf.shape)
    after = mia.online_lira_scores(unseen, conf, held)
    null = mia.grouped_attack(after[held], columns[held], scores[~held], columns[~held])
    assert abs(null["auc"] - 0.5) < 0.04 and null["tpr_at_1pct_fpr"] < 0.03


def test_online_lira_never_uses_a_model_as_its_own_reference():
    _, held, _, conf, _ = _planted_online(m=4, n=50)
    scores = mia.online_lira_scores(conf, conf, held)
    # Model 0's scores do not move when its own reference confidences do.
    moved = conf.copy()
    moved[0] += 100.0
    np.testing.assert_allclose(mia.online_lira_scores(conf, moved, held)[0], scores[0])
    # ...but they do when another model's do.
    moved = conf.copy()
    moved[1] += 100.0
    assert not np.allclose(mia.online_lira_scores(conf, moved, held)[0], scores[0])


def test_online_lira_leaves_out_members_and_examples_without_both_sides():
    _, held, _, conf, _ = _planted_online(m=4, n=20)
    held[:, 0] = True  # example 0: in every model, no out-reference
    targets = np.array([True, True, False, True])
    scores = mia.online_lira_scores(conf, conf, held, targets)
    assert np.isnan(scores[2]).all() and np.isnan(scores[:, 0]).all()
    ins = held.sum(axis=0)[None, :] - held  # each target's in-references per example
    outs = (~held).sum(axis=0)[None, :] - ~held
    both = (ins > 0) & (outs > 0)
    np.testing.assert_array_equal(np.isfinite(scores[targets]), both[targets])


def test_grouped_attack_says_when_a_forget_set_is_too_small():
    got = mia.grouped_attack(np.ones(30), np.arange(30) % 3, np.zeros(500), np.arange(500))
    assert got["n"] == 3 and "too few" in got["skipped"] and "auc" not in got
    # FPRs the non-members cannot resolve give no figure.
    rng = np.random.default_rng(0)
    got = mia.grouped_attack(rng.normal(1, 1, 40), np.arange(40), rng.normal(0, 1, 50),
                             np.arange(50))
    assert got["tpr_at_0.1pct_fpr"] is None and got["tpr_at_1pct_fpr"] is None
    assert 0.6 < got["auc"] < 0.95
