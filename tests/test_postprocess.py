"""model.postprocess and the calibration fitting in train.calibrate, on small hand-checkable cases.

The knee gate (model.gate, its fitting) is tested in tests/test_gate.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from model.contract import InputContract, PostprocessConfig
from model.postprocess import calibrated_probabilities, decode_grades, expected_grade, finish, split_outputs
from train.calibration import (
    FIT_SETS,
    choose_calibration,
    choose_fit_set,
    cross_fitted_val_ece,
    cross_validate_calibration,
    decision_score,
    fit_calibration,
    fit_cutpoints,
    fit_temperature,
    view_probabilities,
)


def test_temperature_divides_the_logits() -> None:
    logits = np.array([[2.0, 0.0], [0.0, 0.0]])
    p1 = calibrated_probabilities(logits, PostprocessConfig())
    p2 = calibrated_probabilities(logits, PostprocessConfig(temperature=2.0))
    np.testing.assert_allclose(p1[0], [np.e**2 / (np.e**2 + 1), 1 / (np.e**2 + 1)])
    np.testing.assert_allclose(p2[0], [np.e / (np.e + 1), 1 / (np.e + 1)])
    np.testing.assert_allclose(p2[1], [0.5, 0.5])
    with pytest.raises(ValueError, match="NaN"):
        calibrated_probabilities(np.array([[np.nan, 0.0]]), PostprocessConfig())


def test_cutpoints_decode_the_expected_grade() -> None:
    # expected grades 0.6, 1.0, 2.7; cut-points 0.5 / 1.5 / 2.5 / 3.5 round them; 0.7 / ... moves the first
    probs = np.array([[0.4, 0.6, 0, 0, 0], [0.2, 0.6, 0.2, 0, 0], [0, 0, 0.3, 0.7, 0]])
    np.testing.assert_allclose(expected_grade(probs), [0.6, 1.0, 2.7])
    rounding = PostprocessConfig(decision="cutpoints", cutpoints=(0.5, 1.5, 2.5, 3.5))
    assert decode_grades(probs, rounding).tolist() == [1, 1, 3]
    later = PostprocessConfig(decision="cutpoints", cutpoints=(0.7, 1.5, 2.8, 3.5))
    assert decode_grades(probs, later).tolist() == [0, 1, 2]
    assert decode_grades(probs, PostprocessConfig()).tolist() == [1, 1, 3]


def test_contract_checks_the_postprocess() -> None:
    with pytest.raises(ValueError, match="increase"):
        PostprocessConfig(decision="cutpoints", cutpoints=(0.5, 0.4, 2.5, 3.5))
    with pytest.raises(ValueError, match="needs cutpoints"):
        PostprocessConfig(decision="cutpoints")
    with pytest.raises(ValueError, match="4 cutpoints"):
        InputContract().replace(postprocess={"decision": "cutpoints", "cutpoints": [0.5, 1.5]})
    c = InputContract().replace(
        postprocess={"temperature": 1.7, "decision": "cutpoints", "cutpoints": [0.6, 1.4, 2.5, 3.5]}
    )
    back = InputContract.from_json(c.to_json())
    assert back == c and back.postprocess.cutpoints == (0.6, 1.4, 2.5, 3.5)
    old = InputContract.from_dict({"format": 1})  # a contract written before postprocess existed
    assert old.postprocess == PostprocessConfig()


def test_finish_flags_refuses_and_averages_mirrors() -> None:
    cfg = PostprocessConfig(uncertain_below=0.6, gate="mahalanobis", gate_threshold=10.0, flip_tta=True)
    outputs = np.array([[4.0, 0, 0, 0, 0, 3.0], [0.2, 0, 0, 0, 0, 50.0]])
    mirrored = np.array([[4.0, 0, 0, 0, 0, 99.0], [0, 0.2, 0, 0, 0, 0.0]])
    a = finish(outputs, cfg, 5, mirrored)
    assert a["grades"].tolist() == [0, 0]
    assert a["refused"].tolist() == [False, True]  # the gate reads the unmirrored image only
    assert a["uncertain"].tolist() == [False, True]
    np.testing.assert_allclose(a["probabilities"].sum(1), 1.0)
    np.testing.assert_allclose(a["probabilities"][1, 0], a["probabilities"][1, 1])  # averaged with the mirror
    with pytest.raises(ValueError, match="mirrored"):
        finish(outputs, cfg, 5)
    logits, gate = split_outputs(outputs[:, :5], 5)
    assert gate is None and finish(outputs[:, :5], PostprocessConfig(), 5)["refused"] is None


def test_fit_temperature_recovers_a_known_temperature() -> None:
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, (4000, 5))
    p = calibrated_probabilities(true_logits, PostprocessConfig())
    labels = np.array([rng.choice(5, p=row) for row in p])
    t = fit_temperature(true_logits * 3.0, labels)  # logits three times too confident
    assert t == pytest.approx(3.0, rel=0.08)


def test_fit_cutpoints_never_scores_worse_than_rounding() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, 600)
    logits = np.eye(5)[labels] * 2.0 + rng.normal(0, 1.2, (600, 5))
    logits[:, 1] -= 1.0  # a model shy of KL1, as ours are
    probs = calibrated_probabilities(logits, PostprocessConfig())
    cuts = fit_cutpoints(probs, labels)
    assert all(b > a for a, b in zip(cuts, cuts[1:]))
    fitted = decode_grades(probs, PostprocessConfig(decision="cutpoints", cutpoints=cuts))
    rounded = decode_grades(probs, PostprocessConfig(decision="cutpoints", cutpoints=(0.5, 1.5, 2.5, 3.5)))
    assert decision_score(labels, fitted, 5) >= decision_score(labels, rounded, 5)


def test_class_bias_is_added_after_the_temperature() -> None:
    logits = np.array([[2.0, 0.0, 0.0, 0.0, 0.0]])
    cfg = PostprocessConfig(temperature=2.0, class_bias=(0.0, 1.0, 0.0, 0.0, 0.0))
    p = calibrated_probabilities(logits, cfg)
    np.testing.assert_allclose(p[0, 0], p[0, 1])  # 2/2 + 0 == 0/2 + 1
    with pytest.raises(ValueError, match="class_bias"):
        calibrated_probabilities(logits, PostprocessConfig(class_bias=(0.0, 1.0)))
    with pytest.raises(ValueError, match="finite"):
        PostprocessConfig(class_bias=(0.0, float("nan")))
    c = InputContract(postprocess=cfg)
    assert InputContract.from_json(c.to_json()) == c
    with pytest.raises(ValueError, match="class_bias"):
        InputContract(postprocess=PostprocessConfig(class_bias=(0.0, 1.0)))


def _shifted(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose true probabilities are softmax(logits / 2 + bias): too confident, shifted."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (n, 5))
    bias = np.array([1.0, -1.0, 0.5, 0.0, -0.5])
    p = calibrated_probabilities(logits, PostprocessConfig(temperature=2.0, class_bias=tuple(bias)))
    return logits, np.array([rng.choice(5, p=row) for row in p])


def test_fit_calibration_recovers_a_temperature_and_bias() -> None:
    logits, labels = _shifted(6000, 3)
    cfg = fit_calibration(logits, labels, "temperature+bias")
    assert cfg.temperature == pytest.approx(2.0, rel=0.1)
    bias = np.array([1.0, -1.0, 0.5, 0.0, -0.5])
    np.testing.assert_allclose(cfg.class_bias, bias - bias.mean(), atol=0.15)
    assert fit_calibration(logits, labels, "none") == PostprocessConfig()
    with pytest.raises(ValueError, match="calibration must be one of"):
        fit_calibration(logits, labels, "isotonic")


def test_cross_validation_prefers_the_method_the_data_need() -> None:
    logits, labels = _shifted(1200, 4)
    groups = np.arange(len(labels)) // 2  # two knees per patient
    cv = cross_validate_calibration(logits, labels, groups, repeats=2)
    assert set(cv) == {"none", "temperature", "temperature+bias"}
    assert cv["temperature"]["cv_ece"] < cv["none"]["cv_ece"]
    assert choose_calibration(cv) == "temperature+bias"
    # a method with a worse NLL than temperature scaling is never chosen, whatever its ECE
    rigged = {m: dict(v) for m, v in cv.items()}
    rigged["temperature+bias"] |= {"cv_nll": cv["temperature"]["cv_nll"] + 1, "cv_ece": 0.0}
    assert choose_calibration(rigged) != "temperature+bias"


def _at_temperature(logits: np.ndarray, t: float, seed: int) -> np.ndarray:
    """Labels drawn from softmax(logits / t): logits that are right after dividing by t."""
    rng = np.random.default_rng(seed)
    p = calibrated_probabilities(logits, PostprocessConfig(temperature=t))
    return np.array([rng.choice(5, p=row) for row in p])


def test_cross_fitting_on_val_prefers_the_set_that_matches_val() -> None:
    """A tune fold that wants T = 1 and a val split that wants T = 2: fitting on val wins, and each
    val knee's figure comes from a fit that did not see it (so val alone is not perfect)."""
    rng = np.random.default_rng(7)
    lt, lv = rng.normal(0, 3, (800, 5)), rng.normal(0, 3, (1000, 5))
    yt, yv = _at_temperature(lt, 1.0, 8), _at_temperature(lv, 2.0, 9)
    gv = np.arange(len(yv)) // 2
    fits = {s: cross_fitted_val_ece((lt, yt), (lv, yv, gv), "temperature", s, repeats=2) for s in FIT_SETS}
    assert fits["tune"]["repeats"] == 1 and fits["val"]["repeats"] == 2
    assert fits["val"]["ece"] < fits["tune+val"]["ece"] < fits["tune"]["ece"]
    assert fits["val"]["nll"] < fits["tune"]["nll"]
    assert fits["val"]["ece"] > 0.005  # out-of-fold: noisy, not in-sample perfect
    assert choose_fit_set(fits) == "val"
    # when the tune fold is as good, it is kept: val is read as little as possible
    tied = {s: dict(fits["val"]) for s in FIT_SETS}
    assert choose_fit_set(tied) == "tune"
    with pytest.raises(ValueError, match="fit_on"):
        cross_fitted_val_ece((lt, yt), (lv, yv, gv), "temperature", "train")


def test_mirror_averaging_is_calibrated_as_it_is_served() -> None:
    """(N, 2, K) logits (an image and its mirror): each view calibrated, then averaged, exactly as
    `finish` answers with flip_tta; a temperature is fitted for the average, and the cross-fitting
    on val takes the same shape."""
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, (3000, 5))
    mirror = logits + rng.normal(0, 1.0, logits.shape)  # the mirror disagrees a little
    labels = np.array([rng.choice(5, p=row) for row in calibrated_probabilities(logits, PostprocessConfig())])
    views = np.stack([logits, mirror], 1) * 2.5  # both views too confident
    t = fit_temperature(views, labels)
    cfg = PostprocessConfig(temperature=t, flip_tta=True)
    served = finish(views[:, 0], cfg, 5, views[:, 1])["probabilities"]
    np.testing.assert_allclose(view_probabilities(views, cfg), served)
    # the fitted temperature is the best for the averaged answer, not for either view alone

    def served_nll(temperature: float) -> float:
        c = PostprocessConfig(temperature=temperature, flip_tta=True)
        q = finish(views[:, 0], c, 5, views[:, 1])["probabilities"]
        return float(-np.log(q[np.arange(len(labels)), labels]).mean())

    assert served_nll(t) < min(served_nll(t * 1.1), served_nll(t / 1.1))
    assert abs(t - fit_temperature(views[:, 0], labels)) > 0.05
    # two identical views are one view
    assert fit_temperature(np.stack([logits, logits], 1), labels) == pytest.approx(fit_temperature(logits, labels))
    fits = cross_fitted_val_ece((views[:1500], labels[:1500]), (views[1500:], labels[1500:], np.arange(1500)),
                                "temperature+bias", "tune+val", repeats=1)  # fmt: skip
    assert 0.0 < fits["ece"] < 0.05
