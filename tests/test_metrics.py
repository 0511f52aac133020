import numpy as np
import pytest

from jaxunlearn import metrics


def test_true_mean_cross_entropy():
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]))
    out = metrics.score(logits, np.array([0, 2]))
    assert out["test_accuracy"] == 0.5
    assert out["test_loss"] == pytest.approx(-(np.log(0.5) + np.log(0.1)) / 2)


def test_aggregations():
    # Three members, two examples, two classes.
    logits = np.log(np.array([
        [[0.9, 0.1], [0.4, 0.6]],
        [[0.4, 0.6], [0.45, 0.55]],
        [[0.45, 0.55], [0.9, 0.1]],
    ]))
    labels = np.array([0, 1])
    vote = metrics.aggregate(logits, labels, method="vote")
    assert vote["test_accuracy"] == 0.5 and vote["test_loss"] is None  # votes: class 1, class 1
    probs = metrics.aggregate(logits, labels, method="mean_probs")
    mean_p = np.exp(logits).mean(axis=0)
    assert probs["test_accuracy"] == 0.5  # mean probs: class 0, class 0
    assert probs["test_loss"] == pytest.approx(-np.mean(np.log([mean_p[0, 0], mean_p[1, 1]])))
    ml = metrics.aggregate(logits, labels, method="mean_logits")
    assert ml["test_loss"] == pytest.approx(metrics.score(logits.mean(0), labels)["test_loss"])
    assert ml["members"] == 3


def test_aggregate_only_live_members():
    logits = np.array([[[5.0, 0.0]], [[0.0, 5.0]]])
    labels = np.array([1])
    assert metrics.aggregate(logits, labels, np.array([False, True]))["test_accuracy"] == 1.0
    assert metrics.aggregate(logits, labels, np.array([True, False]))["test_accuracy"] == 0.0
    assert metrics.aggregate(logits, labels, np.array([False, False]))["test_accuracy"] is None


def test_vote_tie_goes_to_higher_mean_probability():
    logits = np.log(np.array([[[0.6, 0.4]], [[0.1, 0.9]]]))
    assert metrics.aggregate(logits, np.array([1]), method="vote")["test_accuracy"] == 1.0


def test_per_example_loss():
    log_probs = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]))
    out = metrics.per_example_loss(log_probs, np.array([0, 2]))
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, [-np.log(0.5), -np.log(0.1)])
    assert metrics.mean_cross_entropy(log_probs, np.array([0, 2])) == out.mean()
