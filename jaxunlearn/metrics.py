"""Accuracy, true mean cross-entropy, and ensemble aggregation (numpy, on host arrays).

Aggregations over the live members' logits ``[m, n, classes]``:

* ``mean_logits`` (the original study): argmax of the mean logit; loss is the cross-entropy of
  the mean logits.
* ``mean_probs``: argmax of the mean softmax; loss is ``-log`` of the mean probability of the
  true class.
* ``vote`` (SISA): each member votes for its argmax; ties go to the class with the higher mean
  probability; it has no loss (reported as None).
"""

from __future__ import annotations

import numpy as np

from jaxunlearn.config import choices

AGGREGATIONS = choices("aggregation")  # as the setting declares them


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def per_example_loss(log_probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``-log p(label)`` per example (float64 ``[n]``) from log-probabilities ``[n, classes]``."""
    log_probs = np.asarray(log_probs, np.float64)
    labels = np.asarray(labels, np.int64)
    return -np.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]


def mean_cross_entropy(log_probs: np.ndarray, labels: np.ndarray) -> float:
    """True mean over examples of ``-log p(label)`` from log-probabilities ``[n, classes]``."""
    return float(per_example_loss(log_probs, labels).mean())


def accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    return float((scores.argmax(axis=-1) == labels).mean())


def score(logits: np.ndarray, labels: np.ndarray) -> dict:
    """``{"test_accuracy", "test_loss"}`` of one model's logits ``[n, classes]``."""
    logits = np.asarray(logits, np.float64)
    return {"test_accuracy": accuracy(logits, labels),
            "test_loss": mean_cross_entropy(log_softmax(logits), labels)}


def aggregate(member_logits: np.ndarray, labels: np.ndarray, live: np.ndarray | None = None,
              method: str = "mean_logits") -> dict:
    """Scores the ensemble of the ``live`` members (bool ``[m]``; all when None)."""
    if method not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {method!r}; choose one of {AGGREGATIONS}")
    logits = np.asarray(member_logits, np.float64)
    if live is not None:
        logits = logits[np.asarray(live, bool)]
    if logits.shape[0] == 0:
        return {"test_accuracy": None, "test_loss": None, "members": 0}
    if method == "mean_logits":
        out = score(logits.mean(axis=0), labels)
    else:
        probs = np.exp(log_softmax(logits)).mean(axis=0)
        if method == "mean_probs":
            out = {"test_accuracy": accuracy(probs, labels),
                   "test_loss": mean_cross_entropy(np.log(np.maximum(probs, 1e-300)), labels)}
        else:
            classes = logits.shape[-1]
            votes = np.eye(classes)[logits.argmax(axis=-1)].sum(axis=0)  # [n, classes]
            out = {"test_accuracy": accuracy(votes + probs * 1e-3, labels), "test_loss": None}
    out["members"] = int(logits.shape[0])
    return out


def ensemble_log_probs(member_logits: np.ndarray, live: np.ndarray | None = None,
                       method: str = "mean_logits") -> np.ndarray:
    """The live members' combined log-probabilities ``[n, classes]``: the log-softmax of the
    mean logits (``mean_logits``) or the log of the mean probabilities (``mean_probs``, and
    ``vote``, which has no probabilities of its own)."""
    logits = np.asarray(member_logits, np.float64)
    if live is not None:
        logits = logits[np.asarray(live, bool)]
    if method == "mean_logits":
        return log_softmax(logits.mean(axis=0))
    return np.log(np.maximum(np.exp(log_softmax(logits)).mean(axis=0), 1e-300))


def evaluate(member_logits: np.ndarray, labels: np.ndarray, live: np.ndarray | None = None,
             method: str = "mean_logits") -> tuple[dict, np.ndarray | None]:
    """Scores the live members' ensemble on one example set (forget, retain or test).

    Returns ``({"accuracy", "loss", "n"}, per-example loss [n])``; accuracy follows ``method``
    (a majority for ``vote``) and the loss is the true mean cross-entropy of
    `ensemble_log_probs`. With no live member or no example the scores are None.
    """
    labels = np.asarray(labels)
    n = int(labels.shape[0])
    alive = member_logits.shape[0] if live is None else int(np.sum(live))
    if n == 0 or alive == 0:
        return {"accuracy": None, "loss": None, "n": n}, None
    log_probs = ensemble_log_probs(member_logits, live, method)
    losses = per_example_loss(log_probs, labels)
    acc = aggregate(member_logits, labels, live, method)["test_accuracy"]
    return {"accuracy": acc, "loss": float(losses.mean()), "n": n}, losses
