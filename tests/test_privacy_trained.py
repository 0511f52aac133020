"""Membership inference on a small trained memorising ensemble (not synthetic confidences):
6 tiny nets on random halves of 200 sample images, trained until they fit their halves; then a
`forget` of 30 fixed ids with `rewind` and the evaluators' blocks before and after."""

import numpy as np
import pytest

from jaxunlearn import driver, forgetting
from jaxunlearn.config import apply_overrides, get_preset

FORGOTTEN = 30


@pytest.fixture(scope="module")
def memorised(tmp_path_factory, sample):
    """The privacy preset scaled down (about 45 s on 2 CPU cores): every member holds some of
    the forgotten ids, so `rewind` retrains each."""
    cfg = apply_overrides(get_preset("privacy"), {
        "data": "sample", "train_limit": 200, "test_limit": 200, "members": 6,
        "model": "tiny", "stem": "imagenet", "optimizer": "adam", "learning_rate": 0.01,
        "lr_schedule": "constant", "label_smoothing": 0.0, "weight_decay": 0.0,
        "epochs": 60, "batch_size": 50, "eval_batch_size": 200, "retain_eval": 200,
        "strategy": "rewind", "oracle_reference": "none",
        "evaluators": "mia,lira_online"})  # the two attacks the tests compare
    out = tmp_path_factory.mktemp("privacy") / "run"
    driver.train_and_evaluate(cfg, out, dataset=sample, log=lambda s: None, progress=False)
    ids = np.random.default_rng(0).choice(200, FORGOTTEN, replace=False).tolist()
    outcome = forgetting.forget(out, ids, log=lambda s: None, dataset=sample)
    return outcome["results"]["requests"][-1]


def test_the_members_memorise_their_halves(memorised):
    pairs = memorised["lira_online"]["ensemble_before"]["pair_accuracy"]
    # Each member fits the examples it trained on, and not the pool examples it did not see.
    assert pairs["forgotten"] >= 0.9 and pairs["forgotten"] - pairs["unseen"] >= 0.5, pairs


def test_online_lira_tells_members_apart_where_the_loss_attack_is_weaker(memorised):
    before = memorised["lira_online"]["ensemble_before"]
    # Ids that fewer than 2 members drew (no other in-model for a member's pair), or all 6 (no
    # out-model), are left out: about an eighth; at least 20 remain, so a figure is given.
    assert 20 <= before["n"] <= FORGOTTEN, before
    assert before["auc"] >= 0.9 and before["tpr_at_1pct_fpr"] >= 0.5, before
    loss_auc = memorised["mia"]["ensemble_before"]["logistic"]["auc"]
    assert before["auc"] > loss_auc + 0.1, (before["auc"], loss_auc)


def test_after_rewind_the_forgotten_examples_score_like_unseen_ones(memorised):
    after = memorised["lira_online"]["ensemble"]
    before = memorised["lira_online"]["ensemble_before"]
    assert sorted(memorised["invalidated"]) == list(range(6))
    assert abs(after["auc"] - 0.5) <= 0.12, after
    assert after["auc"] < before["auc"] - 0.3
    assert after["tpr_at_1pct_fpr"] <= 0.1, after
    pairs = after["pair_accuracy"]  # as accurate on them as on examples never seen
    assert abs(pairs["forgotten"] - pairs["unseen"]) <= 0.15, pairs
