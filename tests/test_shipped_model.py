"""The committed weights do what the model card says, on real images.

- the knee gate lets the shipped knee fixture through and refuses the shipped non-knee radiographs
  (tests/fixtures/nonknee/, credited in tests/fixtures/README.md) and made-up negatives;
- calibration on a real split: on real validation knees (the dataset beside the repository, as on
  the project's machines and in CI) the fitted temperature gives a lower calibration error than
  none, and the ordinal decoding predicts every grade, KL1 included.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from model.checkpoint import model_from_checkpoint
from model.contract import PostprocessConfig
from model.postprocess import calibrated_probabilities
from train.answers import answer_arrays, made_up_negatives, model_outputs, prepare_files
from train.data import scan
from train.metrics import expected_calibration_error

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
DATA = ROOT.parent / "shared" / "data" / "koa"


@pytest.fixture(scope="module")
def shipped():
    net, contract = model_from_checkpoint(ROOT / "weights" / "oamen.ckpt")
    return net, contract


def test_shipped_weights_carry_a_fitted_gate_and_calibration(shipped) -> None:
    net, contract = shipped
    post = contract.postprocess
    assert bool(net.knee_gate.fitted) and post.gate == "mahalanobis"
    assert post.temperature != 1.0 and 0 < post.uncertain_below < 1


def test_the_knee_passes_and_other_radiographs_are_refused(shipped) -> None:
    """What the server does: the knee-joint finder first (no joint: refused), then the knee gate."""
    import cv2

    from model.localize import find_joints, load_finder, plan

    net, contract = shipped
    finder, cfg = load_finder(ROOT / "weights" / "finder.pt")
    knee = answer_arrays(net, contract, prepare_files([FIXTURES / "knee_kl2.png"], contract))
    assert not knee["refused"][0], f"the fixture knee is refused (score {knee['gate_scores'][0]:.1f})"
    others = sorted((FIXTURES / "nonknee").glob("*.jpg"))
    assert len(others) == 3
    grays = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in others]
    plans = [plan(js, g.shape, cfg) for js, g in zip(find_joints(finder, cfg, grays), grays, strict=True)]
    gate = answer_arrays(net, contract, prepare_files(others, contract))["refused"]
    for path, p, by_gate in zip(others, plans, gate, strict=True):
        assert p.kind == "refuse" or by_gate, f"{path.name} would be graded ({p.kind}, {p.error})"


def test_the_gate_refuses_made_up_negatives(shipped) -> None:
    net, contract = shipped
    knee = prepare_files([FIXTURES / "knee_kl2.png"], contract)
    made_up = made_up_negatives(np.repeat(knee, 4, axis=0))
    for name in ("uniform noise", "a page of text", "flat gray"):
        refused = answer_arrays(net, contract, made_up[name][:4])["refused"]
        assert refused.all(), name


@pytest.mark.skipif(not DATA.is_dir() and os.environ.get("CI") != "true", reason=f"no dataset at {DATA}")
def test_calibration_on_real_validation_knees(shipped) -> None:
    net, contract = shipped
    samples = [s for s in scan(DATA) if s.split == "val"]
    labels = np.array([s.grade for s in samples])
    images = prepare_files([s.path for s in samples], contract)
    answers = answer_arrays(net, contract, images)
    logits = model_outputs(net, images, contract)[:, : contract.num_classes]
    raw = calibrated_probabilities(logits, PostprocessConfig())  # temperature 1: what training left
    if contract.postprocess.flip_tta:
        flipped = model_outputs(net, images, contract, flip=True)[:, : contract.num_classes]
        raw = 0.5 * (raw + calibrated_probabilities(flipped, PostprocessConfig()))
    ece = expected_calibration_error(labels, answers["probabilities"])
    assert ece < expected_calibration_error(labels, raw), "the fitted temperature does not calibrate"
    assert ece < 0.1
    assert set(answers["grades"].tolist()) == {0, 1, 2, 3, 4}, "a grade is never predicted"
