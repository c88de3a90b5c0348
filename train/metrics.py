"""Evaluation metrics for the KL 0-4 knee osteoarthritis grader.

Pure numpy functions (no torch, no sklearn at runtime) that turn integer labels and per-class
probabilities into the numbers reported for a model: top-1 accuracy, balanced accuracy, macro F1,
quadratic weighted kappa (QWK), mean absolute grade error, per-class one-vs-rest (OvR) AUC and
the OvR confusion-matrix statistics. :func:`compute_metrics` bundles everything into a
JSON-serialisable dict. Every public function validates its inputs and raises ``ValueError``
saying what it received and what it expected.

A note on "average accuracy". Some papers (e.g. OA-MEN) report the *mean one-vs-rest binary
accuracy* over the K classes rather than the usual top-1 (multi-class) accuracy. The two are tied
by an exact identity::

    mean_ovr_accuracy = 1 - 2 * (1 - top1) / K

because every wrong prediction costs exactly two one-vs-rest errors -- a false negative for the
true class and a false positive for the predicted class -- and every right prediction costs none.
Summed over the K binary problems there are therefore ``2 * n_wrong`` errors out of ``N * K``
decisions. With K = 5, OA-MEN's 84.88 % "average ACC" corresponds to only 62.2 % top-1 accuracy
(``1 - 0.1512 * 5 / 2 = 0.622``). See :func:`mean_ovr_accuracy_from_top1`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "compute_metrics",
    "confusion_matrix",
    "mean_ovr_accuracy_from_top1",
    "per_class_binary",
    "quadratic_weighted_kappa",
    "roc_auc_ovr",
    "roc_curve_ovr",
    "top1_from_mean_ovr_accuracy",
]


# --------------------------------------------------------------------------- validation helpers
def _describe(a: Any) -> str:
    """Short description of an array-like for error messages."""
    arr = np.asarray(a)
    return f"array with shape {arr.shape} and dtype {arr.dtype}"


def _check_labels(y: Any, name: str, num_classes: int) -> np.ndarray:
    """Validate a 1-D integer label vector with values in ``[0, num_classes)``.

    Args:
        y: Array-like of labels.
        name: Argument name used in error messages.
        num_classes: Number of classes K.

    Returns:
        The labels as an int64 array.

    Raises:
        ValueError: If ``y`` is not 1-D, not integer-valued, or out of range.
    """
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class indices, got {_describe(arr)}")
    if arr.size and not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_)):
        raise ValueError(f"{name} must contain integers (class indices), got {_describe(arr)}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise ValueError(f"{name} values must be in [0, {num_classes}), got min={int(arr.min())}, max={int(arr.max())}")
    return arr


def _check_num_classes(num_classes: Any) -> int:
    """Validate K >= 1."""
    if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return int(num_classes)


def _check_probs(probs: Any, n: int | None = None, k: int | None = None) -> np.ndarray:
    """Validate a finite (N, K) score matrix.

    Args:
        probs: Array-like of per-class scores (probabilities or logits).
        n: Expected number of rows, or None to skip the check.
        k: Expected number of columns, or None to skip the check.

    Returns:
        The scores as a float64 array.

    Raises:
        ValueError: On wrong rank, shape, dtype, or non-finite values.
    """
    arr = np.asarray(probs)
    if arr.ndim != 2:
        raise ValueError(f"probs must be a 2-D (N, K) array, got {_describe(arr)}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"probs must be numeric, got {_describe(arr)}")
    exp_n = "N" if n is None else str(n)
    exp_k = "K" if k is None else str(k)
    if (n is not None and arr.shape[0] != n) or (k is not None and arr.shape[1] != k):
        raise ValueError(f"probs must have shape ({exp_n}, {exp_k}), got shape {arr.shape}")
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"probs must be finite, got {bad} NaN/inf value(s) in shape {arr.shape}")
    return arr


def _check_pair(y_true: Any, y_pred: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate two label vectors of equal length."""
    t = _check_labels(y_true, "y_true", num_classes)
    p = _check_labels(y_pred, "y_pred", num_classes)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred must have the same length, got {t.shape[0]} and {p.shape[0]}")
    return t, p


# --------------------------------------------------------------------------- core metrics
def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Multi-class confusion matrix.

    Args:
        y_true: (N,) true class indices in ``[0, K)``.
        y_pred: (N,) predicted class indices in ``[0, K)``.
        num_classes: Number of classes K.

    Returns:
        int64 array of shape (K, K); ``cm[i, j]`` counts samples with true class i predicted as j
        (rows = true, columns = predicted).
    """
    k = _check_num_classes(num_classes)
    t, p = _check_pair(y_true, y_pred, k)
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k).astype(np.int64)


def _qwk_from_cm(cm: np.ndarray) -> float:
    """Quadratic weighted kappa from a confusion matrix (see :func:`quadratic_weighted_kappa`)."""
    k = cm.shape[0]
    total = cm.sum()
    if total == 0:
        raise ValueError("quadratic_weighted_kappa needs at least one sample, got N=0")
    idx = np.arange(k)
    # Unnormalised quadratic weights; the usual 1/(K-1)^2 factor cancels in the ratio.
    w = (idx[:, None] - idx[None, :]).astype(np.float64) ** 2
    observed = cm.astype(np.float64) / total
    expected = np.outer(cm.sum(axis=1), cm.sum(axis=0)).astype(np.float64) / float(total) ** 2
    num = float((w * observed).sum())
    den = float((w * expected).sum())
    if den == 0.0:
        return 1.0 if num == 0.0 else 0.0
    return 1.0 - num / den


def quadratic_weighted_kappa(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Cohen's kappa with quadratic weights ``w_ij = (i - j)^2``.

    ``kappa = 1 - sum(w * O) / sum(w * E)`` with O the observed joint distribution and E the
    outer product of its marginals. Matches ``sklearn.metrics.cohen_kappa_score(weights="quadratic")``.

    Degenerate case: when the expected weighted disagreement ``sum(w * E)`` is 0 (all true labels
    and all predictions are the same single class) sklearn returns NaN; here we return 1.0 if the
    observed disagreement is also 0 (perfect agreement) and 0.0 otherwise, so the result is always
    a finite float.

    Args:
        y_true: (N,) true class indices.
        y_pred: (N,) predicted class indices.
        num_classes: Number of classes K.

    Returns:
        Kappa in ``[-1, 1]``.

    Raises:
        ValueError: On invalid inputs or N = 0.
    """
    return _qwk_from_cm(confusion_matrix(y_true, y_pred, num_classes))


def per_class_binary(cm: np.ndarray) -> dict[str, list[float] | list[int]]:
    """One-vs-rest binary statistics for every class of a confusion matrix.

    For class k: TP = cm[k, k], FP = column sum - TP, FN = row sum - TP, TN = N - TP - FP - FN.
    Undefined ratios (0/0: precision with no predictions of k, recall with no true k, F1 when
    precision + recall = 0, OvR accuracy when N = 0) are reported as 0.0.

    Args:
        cm: (K, K) confusion matrix, rows = true, columns = predicted.

    Returns:
        Dict with lists of length K: ``precision``, ``recall``, ``f1``, ``ovr_accuracy`` (floats)
        and ``support`` (number of true samples per class, ints).
    """
    arr = np.asarray(cm)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] < 1:
        raise ValueError(f"cm must be a square (K, K) matrix with K >= 1, got {_describe(arr)}")
    if not np.issubdtype(arr.dtype, np.number) or np.any(arr < 0):
        raise ValueError(f"cm must contain non-negative counts, got {_describe(arr)}")
    arr = arr.astype(np.float64)
    total = arr.sum()
    tp = np.diag(arr)
    fp = arr.sum(axis=0) - tp
    fn = arr.sum(axis=1) - tp
    tn = total - tp - fp - fn

    def _div(a: np.ndarray, b: np.ndarray | float) -> np.ndarray:
        b = np.broadcast_to(np.asarray(b, dtype=np.float64), a.shape)
        out = np.zeros_like(a)
        np.divide(a, b, out=out, where=b > 0)
        return out

    precision = _div(tp, tp + fp)
    recall = _div(tp, tp + fn)
    f1 = _div(2 * precision * recall, precision + recall)
    ovr_acc = _div(tp + tn, total)
    return {
        "precision": [float(v) for v in precision],
        "recall": [float(v) for v in recall],
        "f1": [float(v) for v in f1],
        "ovr_accuracy": [float(v) for v in ovr_acc],
        "support": [int(v) for v in arr.sum(axis=1)],
    }


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given the average of their ranks (like scipy.stats.rankdata)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    n = xs.size
    # Boundaries of runs of equal values in the sorted array.
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], n]  # exclusive
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
    ranks_sorted = np.repeat(avg, ends - starts)
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = ranks_sorted
    return ranks


def _binary_auc(pos: np.ndarray, scores: np.ndarray) -> float | None:
    """Mann-Whitney AUC of ``scores`` for boolean labels ``pos``; None if one class is empty."""
    n_pos = int(pos.sum())
    n_neg = int(pos.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(scores)
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_auc_ovr(y_true: np.ndarray, probs: np.ndarray) -> list[float | None]:
    """Per-class one-vs-rest ROC AUC via the Mann-Whitney rank statistic.

    ``AUC_k = P(score_k(pos) > score_k(neg)) + 0.5 * P(tie)``, computed from average ranks, so
    tied scores count one half (all-equal scores give 0.5). Equals
    ``sklearn.metrics.roc_auc_score(y_true == k, probs[:, k])``.

    Args:
        y_true: (N,) true class indices in ``[0, K)``.
        probs: (N, K) finite scores; column k is the score for class k.

    Returns:
        List of K AUCs; an entry is None when class k has no positives or no negatives in y_true.
    """
    p = _check_probs(probs)
    n, k = p.shape
    t = _check_labels(y_true, "y_true", k)
    if t.shape[0] != n:
        raise ValueError(f"y_true has {t.shape[0]} samples but probs has {n} rows; expected equal N")
    return [_binary_auc(t == c, p[:, c]) for c in range(k)]


def roc_curve_ovr(y_true: np.ndarray, probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One-vs-rest ROC curve for class ``k`` (for plotting).

    Thresholds are the distinct scores in decreasing order; the curve starts at (0, 0) and ends
    at (1, 1). Tied scores produce a single diagonal step, consistent with :func:`roc_auc_ovr`
    (the trapezoidal area under the returned curve equals the rank AUC).

    Args:
        y_true: (N,) true class indices.
        probs: (N, K) finite scores.
        k: Class index whose column of ``probs`` is used.

    Returns:
        ``(fpr, tpr)`` float arrays of equal length.

    Raises:
        ValueError: On invalid inputs, or if class k has no positives or no negatives.
    """
    p = _check_probs(probs)
    n, num_classes = p.shape
    t = _check_labels(y_true, "y_true", num_classes)
    if t.shape[0] != n:
        raise ValueError(f"y_true has {t.shape[0]} samples but probs has {n} rows; expected equal N")
    if not isinstance(k, (int, np.integer)) or not 0 <= k < num_classes:
        raise ValueError(f"k must be a class index in [0, {num_classes}), got {k!r}")
    pos = t == k
    n_pos = int(pos.sum())
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC curve for class {k} is undefined: got {n_pos} positive(s) and {n_neg} negative(s)")
    scores = p[:, k]
    order = np.argsort(-scores, kind="mergesort")
    s = scores[order]
    y = pos[order]
    # Last index of each run of equal scores (thresholds).
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    return fpr.astype(np.float64), tpr.astype(np.float64)


# --------------------------------------------------------------------------- OvR accuracy identity
def mean_ovr_accuracy_from_top1(top1: float, k: int) -> float:
    """Mean one-vs-rest binary accuracy implied by a top-1 accuracy over ``k`` classes.

    Identity: ``mean_ovr = 1 - 2 * (1 - top1) / k``. Each wrong prediction is exactly two OvR
    errors (a false negative for its true class and a false positive for the predicted class);
    each correct one is none. Over k binary problems that is ``2 * n_wrong`` errors in ``N * k``
    decisions. Example: OA-MEN's 84.88 % "average ACC" with k = 5 is 62.2 % top-1.

    Args:
        top1: Top-1 accuracy in ``[0, 1]``.
        k: Number of classes (>= 1).

    Returns:
        The mean OvR accuracy.
    """
    k = _check_num_classes(k)
    if not 0.0 <= float(top1) <= 1.0:
        raise ValueError(f"top1 must be in [0, 1], got {top1!r}")
    return 1.0 - 2.0 * (1.0 - float(top1)) / k


def top1_from_mean_ovr_accuracy(mean_ovr: float, k: int) -> float:
    """Inverse of :func:`mean_ovr_accuracy_from_top1`: ``top1 = 1 - k * (1 - mean_ovr) / 2``."""
    k = _check_num_classes(k)
    return 1.0 - k * (1.0 - float(mean_ovr)) / 2.0


# --------------------------------------------------------------------------- bundle
def compute_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """All evaluation metrics for one set of predictions, as a JSON-serialisable dict.

    Predictions are ``argmax(probs, axis=1)`` (ties go to the lowest class index).

    Args:
        y_true: (N,) integer true grades in ``[0, K)``.
        probs: (N, K) finite class scores (probabilities; any monotone scores work for AUC).
        class_names: K class names, e.g. ``["KL0", ..., "KL4"]``.

    Returns:
        Dict with ``n``, ``accuracy`` (top-1), ``balanced_accuracy`` (mean recall over classes
        present in y_true), ``macro_f1`` (mean F1 over classes present in y_true or predictions,
        as sklearn's ``f1_score(average="macro")``), ``qwk``, ``mae`` (mean absolute grade error),
        ``macro_auc`` (mean of defined per-class OvR AUCs, None if none is defined),
        ``mean_ovr_accuracy`` (mean over all K classes of OvR binary accuracy), ``per_class``
        (name -> precision, recall, f1, ovr_accuracy, auc, support), ``confusion_matrix`` (list of
        lists, rows = true) and ``class_names``. Only plain Python types are used.

    Raises:
        ValueError: If shapes, dtypes, ranges or finiteness are wrong, or N = 0.
    """
    names = [str(c) for c in class_names]
    k = len(names)
    if k < 1:
        raise ValueError("class_names must name at least one class, got an empty sequence")
    if len(set(names)) != k:
        raise ValueError(f"class_names must be unique, got {names}")
    t_raw = np.asarray(y_true)
    if t_raw.ndim != 1:
        raise ValueError(f"y_true must be a 1-D array of class indices, got {_describe(t_raw)}")
    n = t_raw.shape[0]
    if n == 0:
        raise ValueError("compute_metrics needs at least one sample, got y_true with N=0")
    p = _check_probs(probs, n=n, k=k)
    t = _check_labels(t_raw, "y_true", k)

    pred = np.argmax(p, axis=1).astype(np.int64)
    cm = confusion_matrix(t, pred, k)
    stats = per_class_binary(cm)
    aucs = roc_auc_ovr(t, p)

    present_true = cm.sum(axis=1) > 0
    present_any = present_true | (cm.sum(axis=0) > 0)
    recall = np.asarray(stats["recall"])
    f1 = np.asarray(stats["f1"])
    defined_aucs = [a for a in aucs if a is not None]

    per_class = {
        name: {
            "precision": stats["precision"][i],
            "recall": stats["recall"][i],
            "f1": stats["f1"][i],
            "ovr_accuracy": stats["ovr_accuracy"][i],
            "auc": aucs[i],
            "support": stats["support"][i],
        }
        for i, name in enumerate(names)
    }
    return {
        "n": int(n),
        "accuracy": float(np.mean(pred == t)),
        "balanced_accuracy": float(recall[present_true].mean()),
        "macro_f1": float(f1[present_any].mean()),
        "qwk": float(_qwk_from_cm(cm)),
        "mae": float(np.mean(np.abs(pred - t))),
        "macro_auc": float(np.mean(defined_aucs)) if defined_aucs else None,
        "mean_ovr_accuracy": float(np.mean(stats["ovr_accuracy"])),
        "per_class": per_class,
        "confusion_matrix": [[int(v) for v in row] for row in cm],
        "class_names": names,
    }
