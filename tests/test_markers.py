"""Burned-in R/L markers (model.markers) and how the handler turns them into a knee's laterality."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from handler.service import Predictor
from model import create_model
from model.checkpoint import load_torchscript
from model.contract import InputContract
from model.markers import Marker, MarkerConfig, assign, candidates, load_reader, patches, read_markers
from tests.conftest import TINY_CONTRACT_ARGS

WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "markers.pt"


def film(shape=(300, 400), seed=0) -> np.ndarray:
    """A dark, noisy film with a bright bone-like band: no letter on it."""
    rng = np.random.default_rng(seed)
    img = np.full(shape, 30, np.float32) + rng.normal(0, 4, shape)
    img[:, shape[1] // 2 - 40 : shape[1] // 2 + 40] += 110
    return np.clip(cv2.GaussianBlur(img, (0, 0), 1.5), 0, 255).astype(np.uint8)


def letter(img: np.ndarray, ch: str, x: int, y: int, height: int = 20, mirrored: bool = False) -> np.ndarray:
    """``img`` with a white printed letter whose top left corner is at (x, y), ``height`` pixels tall."""
    a = np.zeros((96, 96), np.uint8)
    cv2.putText(a, ch, (10, 80), cv2.FONT_HERSHEY_DUPLEX, 2.5, 255, 9, cv2.LINE_AA)
    ys, xs = np.nonzero(a > 80)
    a = a[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    a = cv2.resize(a, (round(a.shape[1] * height / a.shape[0]), height), interpolation=cv2.INTER_AREA)
    if mirrored:
        a = a[:, ::-1]
    out = img.copy()
    region = out[y : y + a.shape[0], x : x + a.shape[1]].astype(np.float32)
    alpha = a.astype(np.float32) / 255
    out[y : y + a.shape[0], x : x + a.shape[1]] = (region * (1 - alpha) + 245 * alpha).astype(np.uint8)
    return out


@pytest.fixture(scope="module")
def reader():
    r = load_reader(WEIGHTS)
    assert r is not None, f"{WEIGHTS} is missing: python -m train.fit_markers --weights {WEIGHTS}"
    return r


def test_the_reader_is_tiny_and_carries_its_threshold(reader):
    net, cfg = reader
    assert WEIGHTS.stat().st_size < 1_000_000
    assert sum(p.numel() for p in net.parameters()) < 50_000
    assert 0.5 <= cfg.threshold < 1


def test_candidates_keep_a_letter_and_patches_are_normalised():
    img = letter(film(), "R", 40, 60)
    cfg = MarkerConfig()
    boxes = candidates(img, cfg)
    assert any(x0 <= 45 and y0 <= 62 and x1 >= 50 and y1 >= 78 for x0, y0, x1, y1 in boxes), boxes
    p = patches(img, boxes, cfg)
    assert p.shape == (len(boxes), 1, cfg.patch, cfg.patch) and p.min() >= 0 and p.max() <= 1
    with pytest.raises(ValueError, match="uint8"):
        candidates(img.astype(np.float32), cfg)


@pytest.mark.parametrize(("ch", "mirrored"), [("R", False), ("L", False), ("L", True), ("R", True)])
def test_a_printed_letter_beside_the_knee_is_read(reader, ch, mirrored):
    [m] = read_markers(reader, letter(film(), ch, 40, 60, mirrored=mirrored))
    assert (m.letter, m.mirrored) == (ch, mirrored)
    assert m.box[0] <= 45 and m.box[1] <= 62 and m.score >= reader[1].threshold


def test_a_film_without_a_marker_claims_nothing(reader):
    assert read_markers(reader, film(seed=1)) == []
    assert read_markers(reader, film(seed=2).astype(np.float32) / 255) == []  # as model.decode gives it
    # other printed capitals are not letters of a side
    img = film(seed=3)
    for k, ch in enumerate("KNEAP"):
        img = letter(img, ch, 20 + 30 * k, 240, height=18)
    assert read_markers(reader, img) == []


def _m(letter: str, x: float) -> Marker:
    return Marker(letter, (int(x) - 5, 10, int(x) + 5, 30), False, 0.999)


def test_assign_one_knee_takes_the_markers_letter_unless_they_disagree():
    assert assign([_m("R", 50)], [300.0], 400) == ["R"]
    assert assign([_m("R", 50), _m("R", 350)], [300.0], 400) == ["R"]
    assert assign([_m("R", 50), _m("L", 350)], [300.0], 400) == [None]
    assert assign([], [300.0], 400) == [None]


def test_assign_two_knees_only_the_knee_in_the_markers_half():
    assert assign([_m("R", 50)], [100.0, 300.0], 400) == ["R", None]
    assert assign([_m("R", 50), _m("L", 380)], [100.0, 300.0], 400) == ["R", "L"]
    # both knees in one half: the marker cannot say which
    assert assign([_m("R", 50)], [100.0, 150.0], 400) == [None, None]


# --- the handler ---------------------------------------------------------------------------------

CONTRACT = InputContract(**TINY_CONTRACT_ARGS)  # the `exported` fixture's (tests/conftest.py)


def _predictor(exported: str, reader, monkeypatch, joints: list) -> Predictor:
    from model.localize import FinderConfig

    scripted, contract = load_torchscript(exported)
    eager = create_model(contract.model_name)
    eager.load_state_dict(scripted.state_dict())
    pred = Predictor(scripted, eager.eval(), contract, torch.device("cpu"), markers=reader)
    pred.finder = (None, FinderConfig(min_joint_px=40))
    monkeypatch.setattr("handler.service.find_joints", lambda net, cfg, grays, device: [joints for _ in grays])
    return pred


def _joint(x: float, y: float, w: float, view: str = "ap"):
    from model.localize import Joint

    return Joint((x - w / 2, y - w / 2, x + w / 2, y + w / 2), view, 0.9)


def _png(img: np.ndarray) -> bytes:
    return cv2.imencode(".png", img)[1].tobytes()


def test_the_handler_names_the_only_knee_from_its_marker(exported, reader, monkeypatch):
    from koa_client.schema import validate_answer

    pred = _predictor(exported, reader, monkeypatch, [_joint(200, 150, 80)])
    [(status, body)] = pred.handle([{"body": _png(letter(film(), "R", 40, 60))}], [{}])
    assert status == 200, body
    validate_answer(body)
    [knee] = body["knees"]
    assert (knee["laterality"], knee["laterality_source"]) == ("R", "marker")
    [(status, body)] = pred.handle([{"body": _png(film())}], [{}])
    assert (body["knees"][0]["laterality"], body["knees"][0]["laterality_source"]) == (None, None)


def test_with_two_knees_a_marker_names_only_the_knee_in_its_half(exported, reader, monkeypatch):
    from koa_client.schema import validate_answer

    pred = _predictor(exported, reader, monkeypatch, [_joint(100, 150, 80), _joint(300, 150, 80)])
    [(status, body)] = pred.handle([{"body": _png(letter(film(), "L", 20, 40))}], [{}])
    assert status == 200, body
    validate_answer(body)
    assert [(k["laterality"], k["laterality_source"]) for k in body["knees"]] == [("L", "marker"), (None, None)]


def test_a_refused_knee_beside_the_marker_keeps_it_from_the_graded_one(exported, reader, monkeypatch):
    pred = _predictor(exported, reader, monkeypatch, [_joint(300, 150, 80), _joint(100, 150, 80, "other")])
    [(status, body)] = pred.handle([{"body": _png(letter(film(), "L", 20, 40))}], [{}])
    assert status == 200
    assert [k["laterality"] for k in body["knees"]] == [None, None]


def test_the_dicom_header_wins_over_a_marker(exported, reader, monkeypatch):
    from koa_client.schema import validate_answer
    from tests.imagebytes import make_dicom

    pixels = letter(film(), "R", 40, 60).astype(np.uint16) * 16
    dcm = make_dicom(pixels, BodyPartExamined="KNEE", ImageLaterality="L")
    pred = _predictor(exported, reader, monkeypatch, [_joint(200, 150, 80)])
    [(status, body)] = pred.handle([{"body": dcm}], [{}])
    assert status == 200, body
    validate_answer(body)
    assert (body["knees"][0]["laterality"], body["knees"][0]["laterality_source"]) == ("L", "dicom")


def test_the_schema_checks_the_laterality_source():
    from koa_client.schema import InvalidAnswer, validate_answer

    knee = {
        "box": [0, 0, 10, 10],
        "side": "left",
        "laterality": "R",
        "laterality_source": "marker",
        "view": "ap",
        "kl_grade": 1,
        "probabilities": [0.2] * 5,
        "oa_probability": 0.6,
        "confidence": 0.2,
        "uncertain": True,
    }
    body = {"schema_version": 3, "image": {"width": 20, "height": 20}, "knees": [knee], "model": {"name": "m"}}
    validate_answer(body)
    for bad in ({"laterality_source": "guess"}, {"laterality_source": None}, {"laterality": None}):
        with pytest.raises(InvalidAnswer, match="laterality"):
            validate_answer({**body, "knees": [{**knee, **bad}]})
    validate_answer({**body, "knees": [{k: v for k, v in knee.items() if k != "laterality_source"}]})  # older servers


def test_the_shipped_reader_claims_no_marker_on_the_fixture_films(reader):
    """The five credited fixture films (tests/fixtures/films) have no burned-in marker
    (annotations/legfilm_markers.csv): the reader must not invent one on real bone, plates or text."""
    root = Path(__file__).resolve().parent / "fixtures" / "films"
    rows = {line.split(",")[0]: line.split(",")[3] for line in
            (Path(__file__).resolve().parents[1] / "annotations" / "legfilm_markers.csv").read_text().splitlines()
            if line.startswith("IMG")}  # fmt: skip
    films = sorted(root.glob("*.jpg"))
    assert len(films) == 5
    for path in films:
        name = path.name.split("_")[-1]
        assert rows[name] == "", f"{name} is annotated with a marker: this test expects none"
        gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        assert read_markers(reader, gray) == [], path.name
