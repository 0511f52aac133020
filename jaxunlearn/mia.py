"""Loss-based membership inference (numpy, on host arrays).

An unlearning audit asks whether the deleted examples still look like training data. A model
that memorised an example usually gives it a low loss, so the per-example loss is the single
feature: members (e.g. the forget set) are told from non-members (e.g. test examples) by

* ``logistic``: a one-feature logistic regression on the standardised loss, fitted by Newton's
  method with a small L2 penalty on the slope so separable data cannot diverge;
* ``threshold``: "member when loss <= t", with ``t`` the training-fold accuracy maximiser.

Both are scored on held-out folds of a stratified k-fold split over balanced classes (the longer
side is subsampled), so chance is 0.5: an accuracy and AUC of 0.5 mean the members are
indistinguishable from non-members, as after exact unlearning; 1.0 means fully exposed.
"""

from __future__ import annotations

import numpy as np

_L2 = 1e-3  # ridge penalty on the logistic slope, added to the summed log-loss
_NEWTON_STEPS = 25


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of ``scores`` (higher = more likely member) for ``labels`` (1 = member, 0 = not).

    The Mann-Whitney statistic with average ranks for ties, so all-equal scores give 0.5.
    """
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in length")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (non-member) or 1 (member)")
    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC needs both classes; got {n_pos} members and {n_neg} non-members")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    starts = np.cumsum(counts) - counts  # 0-based rank of each distinct value's first copy
    ranks = (starts + (counts + 1) / 2.0)[inverse.ravel()]  # 1-based average ranks
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _fit_logistic(z: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """``(a, b)`` minimising the summed log-loss of ``sigmoid(a*z + b)`` plus ``_L2/2 * a**2``."""

    def objective(w):
        t = w[0] * z + w[1]
        return float(np.sum(np.logaddexp(0.0, t) - y * t) + 0.5 * _L2 * w[0] ** 2)

    w = np.zeros(2)
    x = np.stack([z, np.ones_like(z)], axis=1)
    f = objective(w)
    for _ in range(_NEWTON_STEPS):
        p = 0.5 * (1.0 + np.tanh(0.5 * (x @ w)))  # stable sigmoid
        grad = x.T @ (p - y) + np.array([_L2 * w[0], 0.0])
        hess = (x.T * (p * (1.0 - p))) @ x + np.diag([_L2, 1e-12])
        step = np.linalg.solve(hess, grad)
        scale = 1.0
        while scale > 1e-6:  # backtracking keeps Newton monotone
            new = w - scale * step
            f_new = objective(new)
            if f_new <= f:
                break
            scale *= 0.5
        else:
            break
        converged = f - f_new < 1e-12
        w, f = new, f_new
        if converged:
            break
    return float(w[0]), float(w[1])


def _logistic_fold(train_loss, train_y, test_loss, test_y) -> tuple[float, float]:
    mu, sd = train_loss.mean(), train_loss.std()
    sd = sd if sd > 0 else 1.0
    a, b = _fit_logistic((train_loss - mu) / sd, train_y)
    logit = a * (test_loss - mu) / sd + b  # p >= 0.5 iff logit >= 0; same ranking as p, unsaturated
    return float(np.mean((logit >= 0) == (test_y == 1))), auc(logit, test_y)


def _threshold_fold(train_loss, train_y, test_loss, test_y) -> tuple[float, float]:
    values = np.unique(train_loss)
    candidates = np.concatenate([[-np.inf], (values[:-1] + values[1:]) / 2.0, [np.inf]])
    mem = np.sort(train_loss[train_y == 1])
    non = np.sort(train_loss[train_y == 0])
    mem_hit = np.searchsorted(mem, candidates, side="right")  # members with loss <= t
    non_hit = len(non) - np.searchsorted(non, candidates, side="right")  # non-members with loss > t
    t = candidates[int(np.argmax(mem_hit + non_hit))]
    return float(np.mean((test_loss <= t) == (test_y == 1))), auc(-test_loss, test_y)


def _summary(acc: list[float], aucs: list[float]) -> dict:
    return {"accuracy": float(np.mean(acc)), "accuracy_std": float(np.std(acc)),
            "auc": float(np.mean(aucs)), "auc_std": float(np.std(aucs)),
            "per_fold": {"accuracy": [float(v) for v in acc], "auc": [float(v) for v in aucs]}}


def loss_attack(member_losses: np.ndarray, nonmember_losses: np.ndarray, folds: int = 5,
                seed: int = 0) -> dict:
    """Cross-validated loss attacks telling members from non-members by per-example loss.

    The longer side is subsampled (``np.random.default_rng(seed)``) to the shorter's length ``n``;
    ``k = max(2, min(folds, n))`` stratified folds each hold both classes. Returns
    ``{"n", "folds", "logistic", "threshold"}``, each attack ``{"accuracy", "accuracy_std",
    "auc", "auc_std", "per_fold": {"accuracy": [...], "auc": [...]}}`` (held-out mean and
    population std over folds). 0.5 means indistinguishable. With ``n < 2`` it returns
    ``{"n": n, "skipped": ...}`` instead. Losses must be finite.
    """
    mem = np.asarray(member_losses, np.float64).ravel()
    non = np.asarray(nonmember_losses, np.float64).ravel()
    if not (np.isfinite(mem).all() and np.isfinite(non).all()):
        raise ValueError("losses must be finite")
    rng = np.random.default_rng(seed)
    n = min(len(mem), len(non))
    if n < 2:
        return {"n": int(n), "skipped": "need at least 2 examples per class"}
    if len(mem) > n:
        mem = mem[np.sort(rng.choice(len(mem), n, replace=False))]
    if len(non) > n:
        non = non[np.sort(rng.choice(len(non), n, replace=False))]
    k = max(2, min(int(folds), n))
    # Stratified split: each class is shuffled and dealt into k near-equal parts (k <= n, so every
    # fold gets at least one member and one non-member).
    mem_folds = np.array_split(rng.permutation(n), k)
    non_folds = np.array_split(rng.permutation(n), k)
    loss = np.concatenate([mem, non])
    y = np.concatenate([np.ones(n), np.zeros(n)])
    results = {"logistic": ([], []), "threshold": ([], [])}
    for i in range(k):
        test = np.zeros(2 * n, bool)
        test[mem_folds[i]] = True
        test[n + non_folds[i]] = True
        split = (loss[~test], y[~test], loss[test], y[test])
        for name, fit in (("logistic", _logistic_fold), ("threshold", _threshold_fold)):
            acc, area = fit(*split)
            results[name][0].append(acc)
            results[name][1].append(area)
    return {"n": int(n), "folds": int(k),
            **{name: _summary(*vals) for name, vals in results.items()}}


# Per-example membership inference (LiRA) -------------------------------------------------------
#
# The loss attacks above treat every example alike, so an example that is easy for every model
# looks like a member whether or not it was trained on. LiRA (Carlini et al. 2022, "Membership
# inference attacks from first principles") calibrates per example: reference models that did
# not train on the example give the distribution of the model's logit-scaled confidence on it
# when it is not a member, a Gaussian per example, and the model under test is scored by how far
# above that distribution it sits. This is the offline form (out-models only, their paper's
# Section VI-C): test examples, the non-members of the comparison, are in no model's training
# data, so no in-side can be fitted for them; U-LiRA (Hayes et al. 2024) uses it the same way to
# ask whether an unlearned model looks like one that never saw the example.

MIN_POOL = 8  # reference models needed for an example's own variance (else the pooled one)


def logit_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``log p(label) - log(1 - p(label))`` per model and example (float64 ``[..., n]``) from
    logits ``[..., n, classes]``: Gaussian-looking where the loss is not (LiRA's scaling)."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    labels = np.asarray(labels, np.int64)
    hit = np.arange(z.shape[-1]) == labels[:, None]
    own = np.take_along_axis(z, np.broadcast_to(labels[:, None], z.shape[:-1] + (1,)),
                             axis=-1)[..., 0]
    others = np.where(hit, -np.inf, z)
    top = others.max(axis=-1, keepdims=True)
    rest = top[..., 0] + np.log(np.exp(others - top).sum(axis=-1))
    return own - rest


def lira_scores(target: np.ndarray, pool: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Offline LiRA scores (higher = more likely a member) of ``target`` confidences ``[t, n]``
    (``t`` models under test, e.g. an ensemble's members) given the reference models'
    confidences ``pool`` ``[t, k, n]`` and ``out`` (bool, same shape): which reference models may
    serve for target model ``i`` and example ``j`` (they never trained on it, and are not model
    ``i`` itself). Each example's out-Gaussian has the mean of its out-models and their standard
    deviation when there are `MIN_POOL` or more, else the deviation pooled over all examples
    (Carlini et al.'s fixed variance, steadier with few models). Returns ``[n]``: the largest
    score over the ``t`` models (an example is a member if any model trained on it); NaN where
    no model has an out-model for it."""
    target, pool = np.asarray(target, np.float64), np.asarray(pool, np.float64)
    out = np.asarray(out, bool)
    count = out.sum(axis=1)  # [t, n]
    total = np.where(out, pool, 0.0).sum(axis=1)
    mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    resid = np.where(out, pool - mean[:, None, :], 0.0)
    var = (resid ** 2).sum(axis=1) / np.maximum(count - 1, 1)
    usable = count >= 2
    pooled = float((resid ** 2).sum() / max(int((count - 1)[usable].sum()), 1))
    sd = np.sqrt(np.where(count >= MIN_POOL, var, pooled))
    sd = np.where(sd > 0, sd, 1.0)
    z = np.where(count > 0, (target - mean) / sd, -np.inf)
    best = z.max(axis=0)
    return np.where(np.isneginf(best), np.nan, best)


def tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, fpr: float) -> float:
    """The fraction of members scored above the threshold that at most ``fpr`` of the
    non-members exceed (the low-FPR regime where per-example attacks differ from guessing)."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
    neg = np.sort(scores[labels == 0])[::-1]
    allowed = int(np.floor(fpr * len(neg)))  # non-members allowed above the threshold
    threshold = neg[allowed] if allowed < len(neg) else -np.inf
    return float(np.mean(scores[labels == 1] > threshold))


def lira_attack(member_scores: np.ndarray, nonmember_scores: np.ndarray, folds: int = 5,
                seed: int = 0) -> dict:
    """AUC and TPR at 1% and 0.1% FPR of LiRA scores, members vs non-members (NaN scores, with
    no out-model, left out), with the AUC's spread over ``folds`` disjoint stratified parts."""
    mem = np.asarray(member_scores, np.float64)
    non = np.asarray(nonmember_scores, np.float64)
    mem, non = mem[np.isfinite(mem)], non[np.isfinite(non)]
    if len(mem) < 1 or len(non) < 2:
        return {"n": int(len(mem)), "skipped": "need a scored member and two non-members"}
    scores = np.concatenate([mem, non])
    y = np.concatenate([np.ones(len(mem)), np.zeros(len(non))])
    rng = np.random.default_rng(seed)
    k = max(1, min(int(folds), len(mem)))
    parts = [np.array_split(rng.permutation(np.flatnonzero(y == c)), k) for c in (1, 0)]
    aucs = [auc(scores[np.concatenate([parts[0][i], parts[1][i]])],
                y[np.concatenate([parts[0][i], parts[1][i]])]) for i in range(k)]
    return {"n": int(len(mem)), "n_nonmembers": int(len(non)), "auc": auc(scores, y),
            "auc_std": float(np.std(aucs)), "folds": k,
            "tpr_at_1pct_fpr": tpr_at_fpr(scores, y, 0.01),
            "tpr_at_0.1pct_fpr": tpr_at_fpr(scores, y, 0.001)}


# Online LiRA for unlearning (U-LiRA, Hayes et al. 2024) ----------------------------------------
#
# With every example in about half of an ensemble's members (``plan=subset fraction=0.5``), each
# example has reference models on both sides: the members that trained on it ("in") and those
# that did not ("out"). Carlini et al.'s online attack scores a target model's confidence on an
# example by the likelihood ratio of the two Gaussians; U-LiRA asks the same of an unlearned
# model: does its confidence on a forgotten example look like an in-model's or an out-model's?
# Here the target is each member (leave-one-out: its own confidence is never its reference).


def online_lira_scores(target: np.ndarray, reference: np.ndarray, held: np.ndarray,
                       targets: np.ndarray | None = None,
                       references: np.ndarray | None = None) -> np.ndarray:
    """Online LiRA scores ``[m, n]``: ``log N(c; in) - log N(c; out)`` of each target member
    ``i``'s confidence ``target[i, j]`` on example ``j`` (higher: more likely it trained on
    it), the Gaussians fitted to the ``reference`` confidences ``[m, n]`` of the other members,
    split by ``held`` (bool ``[m, n]``: reference member ``k`` trained on example ``j``).
    ``targets`` (bool ``[m]``, default all) are the members scored, ``references`` (default
    all) those that serve as reference models; member ``i`` is never its own reference.

    Each side's mean is the example's own; its deviation is the example's own with `MIN_POOL`
    or more references on that side, else the side's deviation pooled over all examples
    (Carlini et al.'s fixed variance, steadier with few models); all of them without the
    target's own confidences. NaN where a side has no
    reference, and for members not in ``targets``."""
    target, ref = np.asarray(target, np.float64), np.asarray(reference, np.float64)
    held = np.asarray(held, bool)
    m = ref.shape[0]
    scored = np.ones(m, bool) if targets is None else np.asarray(targets, bool)
    refs = np.ones(m, bool) if references is None else np.asarray(references, bool)
    ref = np.where(refs[:, None], ref, 0.0)
    scores = np.zeros(target.shape, np.float64)
    for side in (True, False):
        mask = (held == side) & refs[:, None]  # [m, n]: k is a reference on this side of j
        count = mask.sum(axis=0)
        total = np.where(mask, ref, 0.0).sum(axis=0)
        squares = np.where(mask, ref ** 2, 0.0).sum(axis=0)
        c = count[None, :] - mask  # leave-one-out: target i is not its own reference
        mean = (total[None, :] - np.where(mask, ref, 0.0)) / np.maximum(c, 1)
        ss = squares[None, :] - np.where(mask, ref ** 2, 0.0) - c * mean ** 2
        ss = np.where(c > 0, np.maximum(ss, 0.0), 0.0)
        var = ss / np.maximum(c - 1, 1)
        # Pooled over examples, per target (its own confidences left out as well).
        dof = np.maximum(c - 1, 0).sum(axis=1, keepdims=True)
        pooled = np.where(dof > 0, ss.sum(axis=1, keepdims=True) / np.maximum(dof, 1), 0.0)
        pooled = np.where(pooled > 0, pooled, 1.0)
        var = np.where(c >= MIN_POOL, var, pooled)
        var = np.where(var > 0, var, pooled)
        logpdf = -0.5 * (np.log(2 * np.pi * var) + (target - mean) ** 2 / var)
        scores += np.where(c > 0, logpdf if side else -logpdf, np.nan)
    scores[~scored] = np.nan
    return scores


def grouped_attack(member_scores: np.ndarray, member_groups: np.ndarray,
                   nonmember_scores: np.ndarray, nonmember_groups: np.ndarray, folds: int = 5,
                   seed: int = 0, min_examples: int = 20) -> dict:
    """AUC and TPR at 1% and 0.1% FPR of per-pair scores (a model and an example), members vs
    non-members, with the AUC's spread over ``folds`` parts split by example (``*_groups``: the
    example of each pair), so the pairs of one example never straddle two parts. NaN scores
    (no reference on a side) are left out. Under ``min_examples`` member examples, or too few
    non-member pairs for an FPR, the figure is not given but said to be too small."""
    mem, non = np.asarray(member_scores, np.float64), np.asarray(nonmember_scores, np.float64)
    mg, ng = np.asarray(member_groups), np.asarray(nonmember_groups)
    keep_m, keep_n = np.isfinite(mem), np.isfinite(non)
    mem, mg, non, ng = mem[keep_m], mg[keep_m], non[keep_n], ng[keep_n]
    examples = np.unique(mg)
    out = {"n": int(len(examples)), "pairs": int(len(mem)),
           "n_nonmembers": int(len(np.unique(ng))), "nonmember_pairs": int(len(non)),
           "dropped_pairs": int((~keep_m).sum() + (~keep_n).sum())}
    if len(examples) < min_examples or len(non) < 2:
        return {**out, "skipped": f"{len(examples)} member example(s): too few for a "
                                  f"meaningful figure (at least {min_examples})"}
    scores = np.concatenate([mem, non])
    y = np.concatenate([np.ones(len(mem)), np.zeros(len(non))])
    rng = np.random.default_rng(seed)
    k = max(2, min(int(folds), len(examples)))
    part_of = {}
    for c, groups in ((1, examples), (0, np.unique(ng))):
        for i, chunk in enumerate(np.array_split(rng.permutation(groups), k)):
            part_of.update({(c, int(g)): i for g in chunk})
    parts = np.array([part_of[(1, int(g))] for g in mg] + [part_of[(0, int(g))] for g in ng])
    aucs = [auc(scores[parts == i], y[parts == i]) for i in range(k)
            if 0 < y[parts == i].sum() < (parts == i).sum()]
    out.update({"auc": auc(scores, y), "auc_std": float(np.std(aucs)), "folds": len(aucs)})
    for name, fpr in (("tpr_at_1pct_fpr", 0.01), ("tpr_at_0.1pct_fpr", 0.001)):
        # An FPR of f needs at least 1/f non-member pairs to mean anything.
        out[name] = tpr_at_fpr(scores, y, fpr) if len(non) * fpr >= 1 else None
    return out
