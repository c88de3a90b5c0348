"""Tests for train.plots: each figure function writes a non-empty PNG and closes its figure."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from train import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
KL = ["KL0", "KL1", "KL2", "KL3", "KL4"]


def _assert_png(path: Path) -> None:
    assert path.is_file()
    data = path.read_bytes()
    assert len(data) > 1000
    assert data[:8] == PNG_MAGIC


def _random_preds(seed: int = 0, n: int = 100, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, size=n)
    logits = rng.normal(size=(n, k)) + 2.0 * np.eye(k)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probs


@pytest.mark.parametrize("normalize", [True, False])
def test_confusion_matrix_png(tmp_path: Path, normalize: bool) -> None:
    cm = np.array([[50, 5, 1, 0, 0], [10, 20, 6, 1, 0], [2, 8, 30, 4, 0], [0, 0, 5, 25, 2], [0, 0, 0, 0, 0]])
    out = plots.plot_confusion_matrix(cm, KL, tmp_path / "nested" / "cm.png", title="test", normalize=normalize)
    assert out == tmp_path / "nested" / "cm.png"
    _assert_png(out)
    assert plt.get_fignums() == []


def test_confusion_matrix_shape_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"shape \(5, 5\)"):
        plots.plot_confusion_matrix(np.zeros((3, 3)), KL, tmp_path / "cm.png")


def test_roc_curves_png(tmp_path: Path) -> None:
    y, probs = _random_preds()
    out = plots.plot_roc_curves(y, probs, KL, tmp_path / "roc" / "roc.png", title="ROC")
    _assert_png(out)
    assert plt.get_fignums() == []


def test_roc_curves_with_absent_class(tmp_path: Path) -> None:
    y, probs = _random_preds(k=5)
    y = np.where(y == 4, 3, y)  # class 4 has no positives -> no curve, "n/a" in legend
    out = plots.plot_roc_curves(y, probs, KL, tmp_path / "roc.png")
    _assert_png(out)


def test_training_curves_png(tmp_path: Path) -> None:
    history = [
        {
            "epoch": e,
            "train_loss": 1.5 / e,
            "val_loss": 1.6 / e + 0.05,
            "train_acc": 0.4 + 0.05 * e,
            "val_acc": 0.35 + 0.04 * e,
            "val_qwk": 0.5 + 0.04 * e,
        }
        for e in range(1, 11)
    ]
    out = plots.plot_training_curves(history, tmp_path / "a" / "b" / "curves.png", title="run")
    _assert_png(out)
    assert plt.get_fignums() == []


def test_training_curves_missing_keys(tmp_path: Path) -> None:
    history = [
        {"epoch": 1, "train_loss": 1.2},
        {"epoch": 2, "train_loss": 0.9, "val_loss": 1.0, "val_qwk": None},
        {"train_loss": 0.7, "val_qwk": 0.6},  # no epoch -> row index
    ]
    _assert_png(plots.plot_training_curves(history, tmp_path / "missing.png"))
    _assert_png(plots.plot_training_curves([{"epoch": 1}], tmp_path / "nothing.png"))
    _assert_png(plots.plot_training_curves([], tmp_path / "empty.png"))
    assert plt.get_fignums() == []
