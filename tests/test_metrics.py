"""Tests for train.metrics.

train.metrics calls scikit-learn; the hand-computed small cases are the proof that it calls it right
(label set, weights, tie handling, undefined cases), the random cross-checks that nothing is lost
between sklearn and the dict that is written to metrics.json.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score, f1_score, roc_auc_score

from train import metrics as M

KL = ["KL0", "KL1", "KL2", "KL3", "KL4"]


def _probs_for(pred: list[int], k: int) -> np.ndarray:
    """Scores whose argmax is ``pred`` (0.6 on the predicted class, rest shared)."""
    p = np.full((len(pred), k), 0.4 / (k - 1))
    p[np.arange(len(pred)), pred] = 0.6
    return p


# --------------------------------------------------------------------------- hand-computed cases
def test_two_class_by_hand() -> None:
    # y    = [0, 0, 1, 1, 1]
    # pred = [0, 1, 1, 1, 0]
    # cm = [[1, 1],      class 0: TP=1 FP=1 FN=1 TN=2 -> P=R=F1=1/2, OvR acc=(1+2)/5=0.6
    #       [1, 2]]      class 1: TP=2 FP=1 FN=1 TN=1 -> P=R=F1=2/3, OvR acc=(2+1)/5=0.6
    # QWK, w = [[0,1],[1,0]]: observed weighted disagreement = (1+1)/5 = 0.4
    #   marginals rows = cols = [2/5, 3/5] -> expected = 2 * (2/5)(3/5) = 0.48
    #   kappa = 1 - 0.4/0.48 = 1/6
    y = [0, 0, 1, 1, 1]
    pred = [0, 1, 1, 1, 0]
    cm = M.confusion_matrix(np.array(y), np.array(pred), 2)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, [[1, 1], [1, 2]])
    stats = M.per_class_binary(cm)
    np.testing.assert_allclose(stats["precision"], [0.5, 2 / 3])
    np.testing.assert_allclose(stats["recall"], [0.5, 2 / 3])
    np.testing.assert_allclose(stats["f1"], [0.5, 2 / 3])
    np.testing.assert_allclose(stats["ovr_accuracy"], [0.6, 0.6])
    assert stats["support"] == [2, 3]
    assert M.quadratic_weighted_kappa(np.array(y), np.array(pred), 2) == pytest.approx(1 / 6)

    out = M.compute_metrics(np.array(y), _probs_for(pred, 2), ["neg", "pos"])
    assert out["accuracy"] == pytest.approx(0.6)
    assert out["mean_ovr_accuracy"] == pytest.approx(0.6)  # K=2: 1 - 2*0.4/2 = 0.6
    assert out["qwk"] == pytest.approx(1 / 6)
    assert out["mae"] == pytest.approx(0.4)


def test_three_class_by_hand() -> None:
    # y    = [0, 1, 2]
    # pred = [0, 2, 2]
    # cm = [[1, 0, 0],   class 0: TP=1 FP=0 FN=0 TN=2 -> P=1 R=1 F1=1, OvR acc 3/3
    #       [0, 0, 1],   class 1: TP=0 FP=0 FN=1 TN=2 -> P=0 (0/0) R=0 F1=0, OvR acc 2/3
    #       [0, 0, 1]]   class 2: TP=1 FP=1 FN=0 TN=1 -> P=1/2 R=1 F1=2/3, OvR acc 2/3
    # QWK, w_ij=(i-j)^2 = [[0,1,4],[1,0,1],[4,1,0]]
    #   observed: only cell (1,2), weight 1, mass 1/3          -> 1/3
    #   expected: rows r=[1,1,1]/3, cols c=[1,0,2]/3, E=r c^T
    #     row0: 0*1/9 + 1*0 + 4*2/9 = 8/9
    #     row1: 1*1/9 + 0*0 + 1*2/9 = 3/9
    #     row2: 4*1/9 + 1*0 + 0*2/9 = 4/9                     -> 15/9 = 5/3
    #   kappa = 1 - (1/3)/(5/3) = 0.8
    # top-1 = 2/3, mean OvR acc = (1 + 2/3 + 2/3)/3 = 7/9 = 1 - 2*(1/3)/3
    # balanced acc = (1+0+1)/3, macro F1 = (1+0+2/3)/3 = 5/9, MAE = 1/3
    y = np.array([0, 1, 2])
    pred = np.array([0, 2, 2])
    cm = M.confusion_matrix(y, pred, 3)
    np.testing.assert_array_equal(cm, [[1, 0, 0], [0, 0, 1], [0, 0, 1]])
    stats = M.per_class_binary(cm)
    np.testing.assert_allclose(stats["precision"], [1.0, 0.0, 0.5])
    np.testing.assert_allclose(stats["recall"], [1.0, 0.0, 1.0])
    np.testing.assert_allclose(stats["f1"], [1.0, 0.0, 2 / 3])
    np.testing.assert_allclose(stats["ovr_accuracy"], [1.0, 2 / 3, 2 / 3])
    assert M.quadratic_weighted_kappa(y, pred, 3) == pytest.approx(0.8)

    out = M.compute_metrics(y, _probs_for(pred.tolist(), 3), ["a", "b", "c"])
    assert out["n"] == 3
    assert out["accuracy"] == pytest.approx(2 / 3)
    assert out["balanced_accuracy"] == pytest.approx(2 / 3)
    assert out["macro_f1"] == pytest.approx(5 / 9)
    assert out["qwk"] == pytest.approx(0.8)
    assert out["mae"] == pytest.approx(1 / 3)
    assert out["mean_ovr_accuracy"] == pytest.approx(7 / 9)
    assert out["confusion_matrix"] == [[1, 0, 0], [0, 0, 1], [0, 0, 1]]
    assert out["class_names"] == ["a", "b", "c"]
    # Class-c scores from _probs_for: [0.2, 0.6, 0.6]; the positive (0.6) beats 0.2 and ties 0.6
    # -> AUC = (1 + 0.5) / 2 = 0.75.
    assert out["per_class"]["c"] == pytest.approx(
        {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "ovr_accuracy": 2 / 3, "auc": 0.75, "support": 1}
    )


def test_perfect_predictions() -> None:
    y = np.array([0, 1, 2, 3, 4, 4, 2])
    out = M.compute_metrics(y, np.eye(5)[y], KL)
    assert out["accuracy"] == 1.0
    assert out["qwk"] == 1.0
    assert out["mae"] == 0.0
    assert out["balanced_accuracy"] == 1.0
    assert out["macro_f1"] == 1.0
    assert out["macro_auc"] == 1.0
    assert out["mean_ovr_accuracy"] == 1.0


def test_qwk_degenerate_single_class() -> None:
    # Expected disagreement is 0 when everything is one class: defined as 1.0 (perfect agreement).
    assert M.quadratic_weighted_kappa(np.array([2, 2, 2]), np.array([2, 2, 2]), 5) == 1.0


def test_qwk_is_symmetric_and_penalises_distance() -> None:
    y = np.array([0, 1, 2, 3, 4])
    near = np.array([1, 1, 2, 3, 4])
    far = np.array([4, 1, 2, 3, 4])
    assert M.quadratic_weighted_kappa(y, near, 5) > M.quadratic_weighted_kappa(y, far, 5)
    assert M.quadratic_weighted_kappa(y, far, 5) == pytest.approx(M.quadratic_weighted_kappa(far, y, 5))


# --------------------------------------------------------------------------- AUC
def test_auc_by_hand_with_ties() -> None:
    # Class 1 scores: negatives {0.1, 0.5}, positives {0.5, 0.9}
    # pairs (pos, neg): (0.5,0.1)=1 (0.5,0.5)=0.5 (0.9,0.1)=1 (0.9,0.5)=1 -> 3.5/4 = 0.875
    y = np.array([0, 0, 1, 1])
    s1 = np.array([0.1, 0.5, 0.5, 0.9])
    probs = np.stack([1 - s1, s1], axis=1)
    aucs = M.roc_auc_ovr(y, probs)
    assert aucs[1] == pytest.approx(0.875)
    assert aucs[0] == pytest.approx(0.875)


def test_auc_all_equal_scores_is_half() -> None:
    y = np.array([0, 1, 2, 1, 0, 2])
    probs = np.full((6, 3), 1 / 3)
    assert M.roc_auc_ovr(y, probs) == [0.5, 0.5, 0.5]
    fpr, tpr = M.roc_curve_ovr(y, probs, 1)
    np.testing.assert_allclose(fpr, [0.0, 1.0])
    np.testing.assert_allclose(tpr, [0.0, 1.0])


def test_auc_none_for_absent_class_and_macro_averages_rest() -> None:
    # Class 2 never occurs in y_true -> no positives -> AUC undefined.
    y = np.array([0, 0, 1, 1])
    probs = np.array(
        [
            [0.8, 0.1, 0.1],  # class-0 scores: neg {0.3, 0.6}, pos {0.8, 0.4}
            [0.4, 0.3, 0.3],  # -> (0.8>0.3, 0.8>0.6, 0.4>0.3, 0.4<0.6) = 3/4
            [0.3, 0.6, 0.1],  # class-1 scores: pos {0.6, 0.2}, neg {0.1, 0.3}
            [0.6, 0.2, 0.2],  # -> (0.6>0.1, 0.6>0.3, 0.2>0.1, 0.2<0.3) = 3/4
        ]
    )
    aucs = M.roc_auc_ovr(y, probs)
    assert aucs[0] == pytest.approx(0.75)
    assert aucs[1] == pytest.approx(0.75)
    assert aucs[2] is None
    out = M.compute_metrics(y, probs, ["a", "b", "c"])
    assert out["macro_auc"] == pytest.approx(0.75)
    assert out["per_class"]["c"]["auc"] is None
    assert out["per_class"]["c"]["support"] == 0
    with pytest.raises(ValueError, match="class 2"):
        M.roc_curve_ovr(y, probs, 2)


def test_macro_auc_none_when_single_class() -> None:
    out = M.compute_metrics(np.array([1, 1]), np.array([[0.2, 0.8], [0.7, 0.3]]), ["a", "b"])
    assert out["macro_auc"] is None
    json.dumps(out, allow_nan=False)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_sklearn_random(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, k = 200, 5
    y = rng.integers(0, k, size=n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    probs = np.round(probs, 2)  # force plenty of ties
    aucs = M.roc_auc_ovr(y, probs)
    for c in range(k):
        ref = roc_auc_score(y == c, probs[:, c])
        assert aucs[c] == pytest.approx(ref, abs=1e-12)
        fpr, tpr = M.roc_curve_ovr(y, probs, c)
        assert fpr[0] == 0.0 and tpr[0] == 0.0 and fpr[-1] == 1.0 and tpr[-1] == 1.0
        assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
        assert float(np.trapezoid(tpr, fpr)) == pytest.approx(ref, abs=1e-12)


# --------------------------------------------------------------------------- sklearn cross-checks
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_qwk_and_f1_match_sklearn_random(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, k = 150, 5
    y = rng.integers(0, k, size=n)
    pred = np.clip(y + rng.integers(-2, 3, size=n), 0, k - 1)
    ref = cohen_kappa_score(y, pred, weights="quadratic")
    assert M.quadratic_weighted_kappa(y, pred, k) == pytest.approx(ref, abs=1e-12)

    out = M.compute_metrics(y, np.eye(k)[pred] * 0.9 + 0.02, KL)
    assert out["qwk"] == pytest.approx(ref, abs=1e-12)
    assert out["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-12)
    assert out["accuracy"] == pytest.approx(np.mean(y == pred))
    assert out["mae"] == pytest.approx(np.mean(np.abs(y - pred)))


# --------------------------------------------------------------------------- mean OvR identity
def test_mean_ovr_identity_oa_men() -> None:
    # OA-MEN's 84.88 % "average ACC" over K=5 classes is 62.2 % top-1.
    assert M.mean_ovr_accuracy_from_top1(0.622, 5) == pytest.approx(0.8488)
    assert M.top1_from_mean_ovr_accuracy(0.8488, 5) == pytest.approx(0.622)


@pytest.mark.parametrize("seed", range(5))
def test_mean_ovr_identity_random(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 7))
    n = int(rng.integers(1, 300))
    y = rng.integers(0, k, size=n)
    probs = rng.random((n, k))
    out = M.compute_metrics(y, probs, [f"c{i}" for i in range(k)])
    expected = M.mean_ovr_accuracy_from_top1(out["accuracy"], k)
    assert out["mean_ovr_accuracy"] == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------- output format
def test_output_is_json_serialisable() -> None:
    rng = np.random.default_rng(7)
    y = rng.integers(0, 5, size=40).astype(np.int32)
    probs = rng.random((40, 5)).astype(np.float32)
    probs /= probs.sum(axis=1, keepdims=True)  # float32 probabilities, as fit.py passes them
    out = M.compute_metrics(y, probs, KL)
    text = json.dumps(out, allow_nan=False)
    back = json.loads(text)
    assert back["n"] == 40
    assert set(back["per_class"]) == set(KL)
    assert set(back) >= {
        "n",
        "accuracy",
        "balanced_accuracy",
        "macro_f1",
        "qwk",
        "mae",
        "macro_auc",
        "ece",
        "mean_ovr_accuracy",
        "per_class",
        "confusion_matrix",
        "class_names",
    }
    for key in ("accuracy", "qwk", "mae", "macro_f1", "macro_auc", "ece"):
        assert type(out[key]) is float
    assert type(out["n"]) is int
    assert all(type(v) is int for row in out["confusion_matrix"] for v in row)


def test_argmax_tie_goes_to_lowest_class() -> None:
    out = M.compute_metrics(np.array([0, 1]), np.full((2, 3), 1 / 3), ["a", "b", "c"])
    assert out["confusion_matrix"] == [[1, 0, 0], [1, 0, 0], [0, 0, 0]]


# --------------------------------------------------------------------------- y_pred from another decoder
def test_y_pred_drives_the_label_metrics_and_probs_the_aucs() -> None:
    # y = [0, 1, 2]; argmax of probs = [0, 0, 0], a decoder's y_pred = [0, 1, 1].
    # With y_pred: cm = [[1,0,0],[0,1,0],[0,1,0]], accuracy 2/3, MAE 1/3.
    # QWK: observed only cell (2,1), weight 1, mass 1/3 -> 1/3; rows r = [1,1,1]/3, cols c = [1,2,0]/3
    #   expected = (1/9) * (row0: 0*1 + 1*2 + 4*0 = 2; row1: 1*1 + 0 + 0 = 1; row2: 4*1 + 1*2 + 0 = 6) = 1
    #   kappa = 1 - (1/3)/1 = 2/3
    # The AUCs use the probabilities and do not change.
    y = np.array([0, 1, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.5, 0.4, 0.1], [0.4, 0.3, 0.3]])
    y_pred = np.array([0, 1, 1])
    argmax = M.compute_metrics(y, probs, ["a", "b", "c"])
    out = M.compute_metrics(y, probs, ["a", "b", "c"], y_pred=y_pred)
    assert argmax["confusion_matrix"] == [[1, 0, 0], [1, 0, 0], [1, 0, 0]]
    assert out["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [0, 1, 0]]
    assert out["accuracy"] == pytest.approx(2 / 3)
    assert out["mae"] == pytest.approx(1 / 3)
    assert out["qwk"] == pytest.approx(2 / 3)
    assert out["per_class"]["b"]["precision"] == pytest.approx(0.5)
    assert out["per_class"]["c"]["recall"] == 0.0
    assert out["macro_auc"] == argmax["macro_auc"]
    assert out["ece"] == argmax["ece"]
    assert [out["per_class"][c]["auc"] for c in "abc"] == [argmax["per_class"][c]["auc"] for c in "abc"]
    # The default is exactly argmax.
    assert M.compute_metrics(y, probs, ["a", "b", "c"], y_pred=probs.argmax(axis=1)) == argmax


def test_y_pred_is_validated() -> None:
    probs = np.full((2, 3), 1 / 3)
    with pytest.raises(ValueError, match="y_pred has 3 samples but y_true has 2"):
        M.compute_metrics(np.array([0, 1]), probs, ["a", "b", "c"], y_pred=np.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"y_pred values must be in \[0, 3\), got min=0, max=3"):
        M.compute_metrics(np.array([0, 1]), probs, ["a", "b", "c"], y_pred=np.array([0, 3]))
    with pytest.raises(ValueError, match="y_pred must contain integers"):
        M.compute_metrics(np.array([0, 1]), probs, ["a", "b", "c"], y_pred=np.array([0.0, 1.0]))


# --------------------------------------------------------------------------- calibration
def test_ece_by_hand() -> None:
    # n_bins = 4: edges 0, 0.25, 0.5, 0.75, 1.
    # row  top prob  argmax  y  right   bin
    #  0     0.9       0     0   yes   (0.75, 1]
    #  1     0.8       0     1   no    (0.75, 1]
    #  2     0.6       1     1   yes   (0.5, 0.75]
    #  3     0.7       1     0   no    (0.5, 0.75]
    # bin (0.5, 0.75]: 2 samples, confidence 0.65, accuracy 0.5 -> gap 0.15
    # bin (0.75, 1]:   2 samples, confidence 0.85, accuracy 0.5 -> gap 0.35
    # ECE = 2/4 * 0.15 + 2/4 * 0.35 = 0.25
    y = np.array([0, 1, 1, 0])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]])
    bins = M.reliability_bins(y, probs, n_bins=4)
    assert bins["lower"] == [0.0, 0.25, 0.5, 0.75]
    assert bins["upper"] == [0.25, 0.5, 0.75, 1.0]
    assert bins["count"] == [0, 0, 2, 2]
    assert bins["confidence"][:2] == [None, None] and bins["accuracy"][:2] == [None, None]
    assert bins["confidence"][2:] == pytest.approx([0.65, 0.85])
    assert bins["accuracy"][2:] == pytest.approx([0.5, 0.5])
    assert M.expected_calibration_error(y, probs, n_bins=4) == pytest.approx(0.25)
    json.dumps(bins, allow_nan=False)


def test_ece_zero_when_calibrated_and_one_when_sure_and_wrong() -> None:
    # Ten samples at confidence 0.7, seven of them right: accuracy = confidence in the one bin.
    y = np.array([0] * 7 + [1] * 3)
    probs = np.tile([0.7, 0.3], (10, 1))
    assert M.expected_calibration_error(y, probs, n_bins=4) == pytest.approx(0.0)
    # Certain and always wrong: gap 1 in the last bin.
    assert M.expected_calibration_error(np.array([1, 0]), np.array([[1.0, 0.0], [0.0, 1.0]])) == 1.0


def test_reliability_bins_edges_are_upper_inclusive() -> None:
    # n_bins = 2: edges 0, 0.5, 1 (exact in binary). Confidence 0.5 closes bin (0, 0.5]; 1.0 closes the last.
    y = np.array([0, 0, 0])
    probs = np.array([[0.5, 0.5], [1.0, 0.0], [0.75, 0.25]])
    bins = M.reliability_bins(y, probs, n_bins=2)
    assert bins["count"] == [1, 2]
    assert bins["confidence"] == pytest.approx([0.5, 0.875])


@pytest.mark.parametrize("seed", [0, 1])
def test_ece_matches_a_loop_over_bins(seed: int) -> None:
    # The binning written the way Guo et al. 2017 write it: B_m = {i : (m-1)/M < conf_i <= m/M}.
    rng = np.random.default_rng(seed)
    n, k, n_bins = 300, 5, 15
    y = rng.integers(0, k, size=n)
    logits = rng.normal(size=(n, k)) * 2 + 2.0 * np.eye(k)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    conf, right = probs.max(axis=1), probs.argmax(axis=1) == y
    ece = 0.0
    for m in range(1, n_bins + 1):
        in_bin = (conf > (m - 1) / n_bins) & (conf <= m / n_bins)
        if in_bin.any():
            ece += in_bin.mean() * abs(right[in_bin].mean() - conf[in_bin].mean())
    assert M.expected_calibration_error(y, probs) == pytest.approx(ece, abs=1e-12)
    assert M.compute_metrics(y, probs, KL)["ece"] == pytest.approx(ece, abs=1e-12)
    assert sum(M.reliability_bins(y, probs)["count"]) == n


def test_ece_none_in_compute_metrics_for_logits() -> None:
    out = M.compute_metrics(np.array([0, 1]), np.array([[2.0, -1.0], [0.5, 3.0]]), ["a", "b"])
    assert out["ece"] is None
    assert out["accuracy"] == 1.0


@pytest.mark.parametrize(
    ("y", "probs", "n_bins", "match"),
    [
        (np.array([0, 1]), np.array([[2.0, -1.0], [0.5, 0.5]]), 15, r"probabilities .*in \[0, 1\], got min=-1, max=2"),
        (np.array([0, 1]), np.array([[0.5, 0.4], [0.5, 0.5]]), 15, r"rows must sum to 1, got 0.9 in row 0"),
        (np.array([0, 1]), np.array([[0.5, 0.5], [0.5, 0.5]]), 0, r"n_bins must be a positive int, got 0"),
        (np.array([0, 1, 1]), np.array([[0.5, 0.5], [0.5, 0.5]]), 15, r"3 samples but probs has 2 rows"),
        (np.array([], dtype=int), np.zeros((0, 2)), 15, r"at least one sample, got probs with shape \(0, 2\)"),
        (np.array([0, 2]), np.array([[0.5, 0.5], [0.5, 0.5]]), 15, r"y_true values must be in \[0, 2\)"),
    ],
)
def test_calibration_rejects_bad_input(y: np.ndarray, probs: np.ndarray, n_bins: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        M.expected_calibration_error(y, probs, n_bins=n_bins)
    with pytest.raises(ValueError, match=match):
        M.reliability_bins(y, probs, n_bins=n_bins)


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("y", "probs", "match"),
    [
        (np.array([0, 1]), np.array([0.2, 0.8]), r"2-D .*shape \(2,\)"),
        (np.array([0, 1]), np.zeros((2, 4)), r"shape \(2, 5\), got shape \(2, 4\)"),
        (np.array([0, 1, 2]), np.zeros((2, 5)), r"shape \(3, 5\), got shape \(2, 5\)"),
        (np.array([[0, 1]]), np.zeros((2, 5)), r"1-D .*shape \(1, 2\)"),
        (np.array([0.0, 1.0]), np.zeros((2, 5)), r"integers .*float64"),
        (np.array([0, 5]), np.zeros((2, 5)), r"\[0, 5\), got min=0, max=5"),
        (np.array([-1, 0]), np.zeros((2, 5)), r"got min=-1"),
        (np.array([0, 1]), np.array([[np.nan, 0, 0, 0, 0], [0, 0, 0, 0, 0]]), r"finite, got 1"),
        (np.array([], dtype=int), np.zeros((0, 5)), r"N=0"),
    ],
)
def test_compute_metrics_rejects_bad_input(y: np.ndarray, probs: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        M.compute_metrics(y, probs, KL)


def test_other_validation_errors() -> None:
    with pytest.raises(ValueError, match="same length, got 3 and 2"):
        M.confusion_matrix(np.array([0, 1, 2]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="num_classes"):
        M.confusion_matrix(np.array([0]), np.array([0]), 0)
    with pytest.raises(ValueError, match="N=0"):
        M.quadratic_weighted_kappa(np.array([], dtype=int), np.array([], dtype=int), 3)
    with pytest.raises(ValueError, match="square"):
        M.per_class_binary(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="2 samples but probs has 3 rows"):
        M.roc_auc_ovr(np.array([0, 1]), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="k must be a class index"):
        M.roc_curve_ovr(np.array([0, 1]), np.zeros((2, 2)), 2)
    with pytest.raises(ValueError, match="unique"):
        M.compute_metrics(np.array([0]), np.zeros((1, 2)), ["a", "a"])
    with pytest.raises(ValueError, match="top1"):
        M.mean_ovr_accuracy_from_top1(1.5, 5)
