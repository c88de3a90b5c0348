"""model.postprocess, model.gate and the fitting in train.calibrate, on small hand-checkable cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.contract import InputContract, PostprocessConfig
from model.gate import KneeGate
from model.postprocess import calibrated_probabilities, decode_grades, expected_grade, finish, split_outputs
from train.calibrate import decision_score, fit_cutpoints, fit_gate, fit_temperature


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


def test_gate_scores_the_distance_to_the_nearest_class() -> None:
    gate = KneeGate(num_features=2, num_classes=2)
    assert not bool(gate.fitted)
    gate.set_statistics(torch.tensor([[0.0, 0.0], [10.0, 0.0]]), torch.eye(2) * 0.25)
    scores = gate(torch.tensor([[1.0, 0.0], [9.0, 2.0], [5.0, 0.0]]))
    torch.testing.assert_close(scores, torch.tensor([0.25, 1.25, 6.25]))
    with pytest.raises(ValueError, match="do not fit"):
        gate.set_statistics(torch.zeros(3, 2), torch.eye(2))


def test_fitted_gate_separates_what_it_was_fitted_on_from_the_rest() -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, 900)
    centres = rng.normal(0, 3, (3, 16))
    knees = centres[labels] + rng.normal(0, 1, (900, 16))
    others = rng.normal(0, 1, (200, 16)) + 8.0
    means, precision = fit_gate(knees, labels, 3)
    gate = KneeGate(16, 3)
    gate.set_statistics(torch.from_numpy(means), torch.from_numpy(precision))
    s_knee = gate(torch.from_numpy(knees).float()).numpy()
    s_other = gate(torch.from_numpy(others).float()).numpy()
    threshold = np.quantile(s_knee, 0.99)
    assert (s_other > threshold).mean() > 0.99
