"""Figures for KL-grade evaluation reports: confusion matrix, OvR ROC curves, training curves.

Headless: uses matplotlib's Agg backend, writes PNGs (dpi 120, tight layout), creates parent
directories, closes every figure it opens and returns the output path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from train import metrics as _metrics

__all__ = [
    "plot_confusion_matrix",
    "plot_reliability",
    "plot_roc_curves",
    "plot_selective",
    "plot_training_curves",
]

_DPI = 120


def _save(fig: Figure, path: str | Path) -> Path:
    """Save ``fig`` as PNG to ``path`` (creating parents), close it and return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.tight_layout()
        fig.savefig(out, dpi=_DPI, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return out


def plot_confusion_matrix(
    cm: np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    *,
    title: str = "",
    normalize: bool = True,
) -> Path:
    """Confusion-matrix heatmap with the count and row-normalised percentage in each cell.

    Args:
        cm: (K, K) counts, rows = true grade, columns = predicted grade.
        class_names: K tick labels.
        path: Output PNG path.
        title: Figure title.
        normalize: Colour cells by row-normalised fraction (True) or by raw count (False).

    Returns:
        The path written.
    """
    arr = np.asarray(cm)
    k = len(class_names)
    if arr.ndim != 2 or arr.shape != (k, k):
        raise ValueError(f"cm must have shape ({k}, {k}) to match class_names, got shape {arr.shape}")
    counts = arr.astype(np.int64)
    row_sums = counts.sum(axis=1, keepdims=True)
    frac = np.divide(counts, row_sums, out=np.zeros(counts.shape, dtype=np.float64), where=row_sums > 0)
    shown = frac if normalize else counts.astype(np.float64)
    vmax = 1.0 if normalize else max(float(shown.max()), 1.0)

    size = max(4.0, 0.9 * k + 2.0)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    im = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=vmax)
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label("fraction of true class" if normalize else "count")
    for i in range(k):
        for j in range(k):
            colour = "white" if shown[i, j] > 0.5 * vmax else "black"
            ax.text(
                j,
                i,
                f"{counts[i, j]}\n{100.0 * frac[i, j]:.1f}%",
                ha="center",
                va="center",
                color=colour,
                fontsize=9,
            )
    ax.set_xticks(range(k), labels=list(class_names))
    ax.set_yticks(range(k), labels=list(class_names))
    ax.set_xlabel("Predicted grade")
    ax.set_ylabel("True grade")
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_roc_curves(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    *,
    title: str = "",
) -> Path:
    """One-vs-rest ROC curve per class (AUC in the legend) plus the chance diagonal.

    Classes whose ROC is undefined (no positives or no negatives) get a legend entry marked
    "n/a" and no curve.

    Args:
        y_true: (N,) true class indices.
        probs: (N, K) class scores.
        class_names: K class names.
        path: Output PNG path.
        title: Figure title.

    Returns:
        The path written.
    """
    p = np.asarray(probs)
    if p.ndim != 2 or p.shape[1] != len(class_names):
        raise ValueError(f"probs must have shape (N, {len(class_names)}) to match class_names, got shape {p.shape}")
    aucs = _metrics.roc_auc_ovr(y_true, p)
    fig, ax = plt.subplots(figsize=(6.0, 5.5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance (AUC = 0.500)")
    for k, name in enumerate(class_names):
        auc = aucs[k]
        if auc is None:
            ax.plot([], [], label=f"{name} (AUC n/a)")
            continue
        fpr, tpr = _metrics.roc_curve_ovr(y_true, p, k)
        ax.plot(fpr, tpr, linewidth=1.5, label=f"{name} (AUC = {auc:.3f})")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or "One-vs-rest ROC")
    return _save(fig, path)


def plot_reliability(bins: dict[str, list[Any]], path: str | Path, *, title: str = "") -> Path:
    """Reliability diagram: accuracy against mean confidence per bin (`train.metrics.reliability_bins`),
    bar width = bin, the diagonal = perfect calibration, bin counts as a histogram below."""
    lower, upper = np.asarray(bins["lower"]), np.asarray(bins["upper"])
    counts = np.asarray(bins["count"])
    acc = np.array([a if a is not None else np.nan for a in bins["accuracy"]], dtype=float)
    conf = np.array([c if c is not None else np.nan for c in bins["confidence"]], dtype=float)
    fig, (ax, axh) = plt.subplots(2, 1, figsize=(5.5, 6.0), height_ratios=(3, 1), sharex=True)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfectly calibrated")
    ax.bar(lower, np.nan_to_num(acc), width=upper - lower, align="edge", alpha=0.7, edgecolor="k", label="accuracy")
    ax.scatter(conf, acc, color="C3", zorder=3, s=14, label="mean confidence, accuracy")
    ax.set_ylabel("Accuracy")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title or "Reliability")
    axh.bar(lower, counts, width=upper - lower, align="edge", color="C0", alpha=0.6)
    axh.set_xlabel("Confidence (probability of the grade given)")
    axh.set_ylabel("Images")
    axh.set_xlim(0, 1)
    return _save(fig, path)


def plot_selective(curve: Sequence[dict[str, float]], path: str | Path, *, title: str = "") -> Path:
    """Selective prediction: accuracy of the most confident answers against the share kept."""
    cov = [r["coverage"] for r in curve]
    acc = [r["accuracy"] for r in curve]
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    ax.plot(cov, acc, marker="o", markersize=3)
    ax.set_xlabel("Coverage (share of answers not flagged, most confident first)")
    ax.set_ylabel("Accuracy of those answers")
    ax.set_xlim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title or "Accuracy against coverage")
    return _save(fig, path)


def _series(history: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) for rows of ``history`` where ``key`` is present and not None."""
    xs: list[float] = []
    ys: list[float] = []
    for i, row in enumerate(history):
        val = row.get(key)
        if val is None:
            continue
        epoch = row.get("epoch")
        xs.append(float(epoch) if epoch is not None else float(i + 1))
        ys.append(float(val))
    return xs, ys


def plot_training_curves(history: list[dict[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Two-panel training curves: loss (train/val) and accuracy/QWK (train acc, val acc, val QWK).

    Rows may lack any key (or hold None); such points are skipped, and a metric absent from all
    rows gets no line. A missing ``epoch`` falls back to the 1-based row index.

    Args:
        history: One dict per epoch with optional ``epoch``, ``train_loss``, ``val_loss``,
            ``train_acc``, ``val_acc``, ``val_qwk``.
        path: Output PNG path.
        title: Figure title.

    Returns:
        The path written.
    """
    panels = [
        ("Loss", [("train_loss", "train loss"), ("val_loss", "val loss")]),
        ("Accuracy / QWK", [("train_acc", "train acc"), ("val_acc", "val acc"), ("val_qwk", "val QWK")]),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.0))
    for ax, (ylabel, keys) in zip(axes, panels, strict=True):
        drawn = 0
        for key, label in keys:
            xs, ys = _series(history, key)
            if not xs:
                continue
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
            drawn += 1
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    if title:
        fig.suptitle(title)
    return _save(fig, path)
