"""Evaluation metrics for the KL 0-4 knee osteoarthritis grader.

Thin, validated wrappers around `sklearn.metrics` (top-1, balanced accuracy, macro F1, QWK, MAE,
per-class OvR AUC, ECE); `compute_metrics` bundles them into a JSON-serialisable dict. Why OA-MEN's
"average accuracy" is not top-1: docs/TRAINING.md (`train.metrics`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn import metrics as skm

__all__ = [
    "compute_metrics",
    "confusion_matrix",
    "expected_calibration_error",
    "mean_ovr_accuracy_from_top1",
    "per_class_binary",
    "quadratic_weighted_kappa",
    "reliability_bins",
    "roc_auc_ovr",
    "roc_curve_ovr",
    "top1_from_mean_ovr_accuracy",
]

# Rows of a probability matrix must sum to 1 within this: float32 softmax is off by ~1e-7, and
# probabilities rounded to 4 decimals (as in a JSON answer) by at most K * 5e-5.
_PROB_SUM_ATOL = 1e-3


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


def _probability_problem(p: np.ndarray) -> str | None:
    """Why the (N, K) matrix ``p`` is not one probability distribution per row, or None if it is."""
    if p.size and (p.min() < 0.0 or p.max() > 1.0):
        return f"values must be in [0, 1], got min={p.min():.4g}, max={p.max():.4g}"
    sums = p.sum(axis=1)
    worst = int(np.argmax(np.abs(sums - 1.0))) if sums.size else 0
    if sums.size and abs(sums[worst] - 1.0) > _PROB_SUM_ATOL:
        return f"rows must sum to 1, got {sums[worst]:.6g} in row {worst}"
    return None


def _check_prob_matrix(y_true: Any, probs: Any, n_bins: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """Validate labels, a probability matrix and a bin count for the calibration functions."""
    if not isinstance(n_bins, (int, np.integer)) or isinstance(n_bins, bool) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    p = _check_probs(probs)
    n, k = p.shape
    if n == 0:
        raise ValueError(f"calibration needs at least one sample, got probs with shape {p.shape}")
    t = _check_labels(y_true, "y_true", k)
    if t.shape[0] != n:
        raise ValueError(f"y_true has {t.shape[0]} samples but probs has {n} rows; expected equal N")
    problem = _probability_problem(p)
    if problem is not None:
        raise ValueError(f"probs must be probabilities (softmax outputs, not logits): {problem}")
    return t, p, int(n_bins)


def _check_pair(y_true: Any, y_pred: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate two label vectors of equal length."""
    t = _check_labels(y_true, "y_true", num_classes)
    p = _check_labels(y_pred, "y_pred", num_classes)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred must have the same length, got {t.shape[0]} and {p.shape[0]}")
    return t, p


def _check_scores(y_true: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate labels and an (N, K) score matrix with the same N."""
    p = _check_probs(probs)
    n, k = p.shape
    t = _check_labels(y_true, "y_true", k)
    if t.shape[0] != n:
        raise ValueError(f"y_true has {t.shape[0]} samples but probs has {n} rows; expected equal N")
    return t, p


# --------------------------------------------------------------------------- core metrics
def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Multi-class confusion matrix over all K classes (``sklearn.metrics.confusion_matrix``).

    Args:
        y_true: (N,) true class indices in ``[0, K)``.
        y_pred: (N,) predicted class indices in ``[0, K)``.
        num_classes: Number of classes K.

    Returns:
        int64 array of shape (K, K); ``cm[i, j]`` counts samples with true class i predicted as j
        (rows = true, columns = predicted). Classes absent from both vectors get zero rows/columns.
    """
    k = _check_num_classes(num_classes)
    t, p = _check_pair(y_true, y_pred, k)
    if t.size == 0 or k == 1:  # sklearn refuses empty input and warns on a 1 x 1 matrix; both are well defined
        return np.full((k, k), t.size, dtype=np.int64)
    return skm.confusion_matrix(t, p, labels=np.arange(k)).astype(np.int64)


def quadratic_weighted_kappa(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Cohen's kappa with quadratic weights (``sklearn.metrics.cohen_kappa_score(weights="quadratic")``).

    ``kappa = 1 - sum(w * O) / sum(w * E)`` with ``w_ij = (i - j)^2``, O the observed joint
    distribution and E the outer product of its marginals.

    Degenerate case: the expected disagreement ``sum(w * E)`` is 0 only when every true label and
    every prediction is the same single class, i.e. perfect agreement; sklearn calls that undefined
    (NaN plus a warning), here it is 1.0, so the result is always a finite float.

    Args:
        y_true: (N,) true class indices.
        y_pred: (N,) predicted class indices.
        num_classes: Number of classes K.

    Returns:
        Kappa in ``[-1, 1]``.

    Raises:
        ValueError: On invalid inputs or N = 0.
    """
    k = _check_num_classes(num_classes)
    t, p = _check_pair(y_true, y_pred, k)
    if t.size == 0:
        raise ValueError("quadratic_weighted_kappa needs at least one sample, got N=0")
    if np.unique(np.concatenate([t, p])).size == 1:
        return 1.0
    return float(skm.cohen_kappa_score(t, p, labels=np.arange(k), weights="quadratic"))


def per_class_binary(cm: np.ndarray) -> dict[str, list[float] | list[int]]:
    """One-vs-rest binary statistics for every class of a confusion matrix.

    For class k: TP = cm[k, k], FP = column sum - TP, FN = row sum - TP, TN = N - TP - FP - FN.
    Undefined ratios (0/0: precision with no predictions of k, recall with no true k, F1 when
    precision + recall = 0, OvR accuracy when N = 0) are reported as 0.0, as sklearn's
    ``zero_division=0``. This one stays in numpy because its input is a matrix, not labels, and
    sklearn's functions take labels; :func:`compute_metrics` calls sklearn on the labels.

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


def roc_auc_ovr(y_true: np.ndarray, probs: np.ndarray) -> list[float | None]:
    """Per-class one-vs-rest ROC AUC: ``sklearn.metrics.roc_auc_score(y_true == k, probs[:, k])``.

    ``AUC_k = P(score_k(pos) > score_k(neg)) + 0.5 * P(tie)``, so tied scores count one half
    (all-equal scores give 0.5).

    Args:
        y_true: (N,) true class indices in ``[0, K)``.
        probs: (N, K) finite scores; column k is the score for class k.

    Returns:
        List of K AUCs; an entry is None when class k has no positives or no negatives in y_true
        (where sklearn raises).
    """
    t, p = _check_scores(y_true, probs)
    aucs: list[float | None] = []
    for c in range(p.shape[1]):
        pos = t == c
        defined = 0 < int(pos.sum()) < pos.size
        aucs.append(float(skm.roc_auc_score(pos, p[:, c])) if defined else None)
    return aucs


def roc_curve_ovr(y_true: np.ndarray, probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One-vs-rest ROC curve for class ``k`` (for plotting), from ``sklearn.metrics.roc_curve``.

    One point per distinct score (``drop_intermediate=False``), in decreasing order of threshold;
    the curve starts at (0, 0) and ends at (1, 1). Tied scores produce a single diagonal step, so
    the trapezoidal area under the curve equals :func:`roc_auc_ovr`.

    Args:
        y_true: (N,) true class indices.
        probs: (N, K) finite scores.
        k: Class index whose column of ``probs`` is used.

    Returns:
        ``(fpr, tpr)`` float64 arrays of equal length.

    Raises:
        ValueError: On invalid inputs, or if class k has no positives or no negatives.
    """
    t, p = _check_scores(y_true, probs)
    n, num_classes = p.shape
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 0 <= k < num_classes:
        raise ValueError(f"k must be a class index in [0, {num_classes}), got {k!r}")
    pos = t == k
    n_pos = int(pos.sum())
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC curve for class {k} is undefined: got {n_pos} positive(s) and {n_neg} negative(s)")
    fpr, tpr, _ = skm.roc_curve(pos, p[:, k], drop_intermediate=False)
    return fpr.astype(np.float64), tpr.astype(np.float64)


# --------------------------------------------------------------------------- calibration
def reliability_bins(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> dict[str, list[Any]]:
    """Top-label reliability diagram data: accuracy against confidence in equal-width bins.

    The confidence of a sample is its top probability ``max_k probs[i, k]``, its prediction the
    argmax (ties to the lowest class). Bin b covers ``(b / n_bins, (b + 1) / n_bins]``; the first
    bin also holds confidence 0 (Guo et al. 2017).

    Args:
        y_true: (N,) true class indices in ``[0, K)``.
        probs: (N, K) probabilities: values in [0, 1], each row summing to 1.
        n_bins: Number of equal-width bins over [0, 1].

    Returns:
        Dict of lists of length ``n_bins``: ``lower`` and ``upper`` (bin edges), ``count``
        (samples in the bin, ints), ``confidence`` (mean top probability) and ``accuracy``
        (fraction of the bin's samples whose argmax is right); the last two are None for an
        empty bin.

    Raises:
        ValueError: On invalid shapes, labels, N = 0, a non-positive ``n_bins``, or scores that
            are not probabilities.
    """
    t, p, n_bins = _check_prob_matrix(y_true, probs, n_bins)
    conf = p.max(axis=1)
    correct = (np.argmax(p, axis=1) == t).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # searchsorted(side="left") puts a value equal to an edge into the bin that edge closes.
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    correct_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    return {
        "lower": [float(v) for v in edges[:-1]],
        "upper": [float(v) for v in edges[1:]],
        "count": [int(c) for c in count],
        "confidence": [float(s / c) if c else None for s, c in zip(conf_sum, count)],
        "accuracy": [float(s / c) if c else None for s, c in zip(correct_sum, count)],
    }


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """Top-label expected calibration error (Guo et al. 2017).

    ``ECE = sum_b (n_b / N) * |accuracy_b - confidence_b|`` over the equal-width bins of
    :func:`reliability_bins`: 0 for a perfectly calibrated model, at most 1.

    Args:
        y_true: (N,) true class indices in ``[0, K)``.
        probs: (N, K) probabilities: values in [0, 1], each row summing to 1.
        n_bins: Number of equal-width bins over [0, 1].

    Returns:
        The ECE as a float in ``[0, 1]``.

    Raises:
        ValueError: As :func:`reliability_bins`.
    """
    bins = reliability_bins(y_true, probs, n_bins)
    n = sum(bins["count"])
    return float(
        sum(c / n * abs(acc - conf) for c, acc, conf in zip(bins["count"], bins["accuracy"], bins["confidence"]) if c)
    )


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
def compute_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    y_pred: np.ndarray | None = None,
) -> dict[str, Any]:
    """All evaluation metrics for one set of predictions, as a JSON-serialisable dict.

    The predicted grades are ``y_pred`` when given (a decoder other than argmax, e.g. the
    expected grade rounded), else ``argmax(probs, axis=1)`` (ties go to the lowest class index).
    Accuracy, F1, QWK, MAE, the confusion matrix and the per-class figures are computed from
    these predictions; the AUCs and the ECE from the probabilities.

    Args:
        y_true: (N,) integer true grades in ``[0, K)``.
        probs: (N, K) finite class scores (probabilities; any monotone scores work for AUC).
        class_names: K class names, e.g. ``["KL0", ..., "KL4"]``.
        y_pred: Optional (N,) integer predicted grades in ``[0, K)``.

    Returns:
        Dict with ``n``, ``accuracy`` (top-1), ``balanced_accuracy`` (mean recall over classes
        present in y_true), ``macro_f1`` (mean F1 over classes present in y_true or predictions,
        as sklearn's ``f1_score(average="macro")``), ``qwk``, ``mae`` (mean absolute grade error),
        ``macro_auc`` (mean of defined per-class OvR AUCs, None if none is defined), ``ece``
        (top-label ECE with 15 bins, see :func:`expected_calibration_error`; None when ``probs``
        are not probabilities, e.g. logits), ``mean_ovr_accuracy`` (mean over all K classes of
        OvR binary accuracy), ``per_class`` (name -> precision, recall, f1, ovr_accuracy, auc,
        support), ``confusion_matrix`` (list of lists, rows = true) and ``class_names``. Only
        plain Python types are used.

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
    if y_pred is None:
        pred = np.argmax(p, axis=1).astype(np.int64)
    else:
        pred = _check_labels(y_pred, "y_pred", k)
        if pred.shape[0] != n:
            raise ValueError(f"y_pred has {pred.shape[0]} samples but y_true has {n}; expected equal N")

    labels = np.arange(k)
    cm = confusion_matrix(t, pred, k)
    precision, recall, f1, support = skm.precision_recall_fscore_support(t, pred, labels=labels, zero_division=0.0)
    # (K, 2, 2) per class: [[TN, FP], [FN, TP]]; OvR accuracy = (TN + TP) / N.
    ovr = skm.multilabel_confusion_matrix(t, pred, labels=labels)
    ovr_accuracy = (ovr[:, 0, 0] + ovr[:, 1, 1]) / n
    aucs = roc_auc_ovr(t, p)
    defined_aucs = [a for a in aucs if a is not None]
    with warnings.catch_warnings():
        # sklearn warns when a predicted class has no true sample; that class's recall is
        # undefined and is left out of the mean, which is what balanced accuracy means here.
        warnings.simplefilter("ignore", UserWarning)
        balanced = skm.balanced_accuracy_score(t, pred)

    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "ovr_accuracy": float(ovr_accuracy[i]),
            "auc": aucs[i],
            "support": int(support[i]),
        }
        for i, name in enumerate(names)
    }
    return {
        "n": int(n),
        "accuracy": float(skm.accuracy_score(t, pred)),
        "balanced_accuracy": float(balanced),
        "macro_f1": float(skm.f1_score(t, pred, average="macro", zero_division=0.0)),
        "qwk": quadratic_weighted_kappa(t, pred, k),
        "mae": float(skm.mean_absolute_error(t, pred)),
        "macro_auc": float(np.mean(defined_aucs)) if defined_aucs else None,
        "ece": expected_calibration_error(t, p) if _probability_problem(p) is None else None,
        "mean_ovr_accuracy": float(np.mean(ovr_accuracy)),
        "per_class": per_class,
        "confusion_matrix": [[int(v) for v in row] for row in cm],
        "class_names": names,
    }
