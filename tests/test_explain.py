"""Explanation methods (handler/explain.py) and the measures of them (ops/explain_metrics.py), on tiny
hand-checkable arrays and an untrained oamen_lite."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from handler.explain import (
    METHODS,
    attribute,
    film_overlay_png,
    fused_stages,
    heat_grid,
    overlay_png,
    unletterbox,
)
from model import create_model
from ops.explain_metrics import (
    FRACTIONS,
    auc,
    band_share,
    cascade_groups,
    cell_order,
    joint_mask,
    joint_rows,
    perturbed,
    randomise,
    share,
    spearman,
)


def knee(gap_left: int = 120, gap_right: int = 120, size: int = 224) -> np.ndarray:
    """A drawn knee: bright bone above and below a dark gap (the joint space), per compartment."""
    img = np.full((size, size), 170, np.uint8)
    img[gap_left - 3 : gap_left + 4, : size // 2] = 40
    img[gap_right - 3 : gap_right + 4, size // 2 :] = 40
    img[60:70] = 60  # a darker band higher up that is not bounded by bone on both sides within reach
    img[:, :10] = 20
    return img


def test_the_joint_line_is_found_per_compartment():
    left, right = joint_rows(knee(120, 126))
    assert abs(left - 120) <= 1 and abs(right - 126) <= 1  # the gap's flat bottom is 3 rows deep once smoothed
    rows = joint_rows(knee(100, 170))  # too far apart: one compartment misread, both take the stronger line
    assert rows[0] == rows[1]


def test_the_joint_mask_covers_the_line_with_margins():
    mask = joint_mask(knee(120, 120))
    assert mask[120, 50] and mask[120 + 20, 150] and not mask[40, 50] and not mask[120, 2]
    with pytest.raises(ValueError, match="2-D crop"):
        joint_rows(np.zeros((10, 10)))


def test_shares_of_heat():
    mask = np.zeros((4, 4), bool)
    mask[:2] = True
    heat = np.zeros((4, 4))
    heat[0, 0], heat[3, 3] = 3.0, 1.0
    assert share(heat, mask) == 0.75 and share(np.zeros((4, 4)), mask) == 0.0
    assert band_share(np.ones((16, 16))) == pytest.approx(5 / 16)  # a uniform map: issue 34's 0.31
    assert band_share(np.ones((16, 16)), 0.0, 0.15) == pytest.approx(2 / 16)


def test_deletion_and_insertion_images():
    x = torch.ones(1, 1, 4, 4)
    base = torch.zeros(1, 1, 4, 4)
    heat = np.array([[1.0, 1.0, 0.0, 0.0]] * 2 + [[0.0] * 4] * 2)  # the top-left 2 x 2 cell is hottest
    order = cell_order(heat, 2)
    assert order[0] == 0
    dele = perturbed(x, base, order, 2, "deletion", fractions=(0.0, 0.25, 1.0))
    ins = perturbed(x, base, order, 2, "insertion", fractions=(0.0, 0.25, 1.0))
    assert dele[0].sum() == 16 and dele[1, 0, :2, :2].sum() == 0 and dele[1].sum() == 12 and dele[2].sum() == 0
    assert ins[0].sum() == 0 and ins[1].sum() == 4 and ins[2].sum() == 16
    assert sorted(cell_order(heat, 2, np.random.default_rng(0))) == [0, 1, 2, 3]


def test_auc_and_spearman():
    assert auc([1.0] * len(FRACTIONS)) == pytest.approx(1.0) and auc([0.0, 1.0], (0.0, 1.0)) == 0.5
    a = np.arange(16.0).reshape(4, 4)
    assert spearman(a, a**2) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, np.ones((4, 4))) == 0.0


def test_cascading_randomisation_starts_at_the_head_and_changes_the_weights():
    torch.manual_seed(0)
    net = create_model("oamen_lite").eval()
    groups = cascade_groups(net)
    assert groups[0][0] == "head" and len(groups) == 5
    before = net.head[-1].weight.clone()
    stem = net.stem[0].weight.clone()
    randomise(groups[0][1], seed=1)
    assert not torch.equal(before, net.head[-1].weight) and torch.equal(stem, net.stem[0].weight)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_a_map_in_unit_range(method):
    torch.manual_seed(0)
    net = create_model("oamen_lite").eval()
    heat = attribute(net, torch.randn(1, 1, 64, 64), 2, method)
    assert heat.shape == (64, 64) and heat.dtype == np.float32 and np.isfinite(heat).all()
    assert heat.min() >= 0 and heat.max() <= 1
    with pytest.raises(ValueError, match="unknown explanation method"):
        attribute(net, torch.randn(1, 1, 64, 64), 2, "guess")


def test_layercam_fuses_the_last_stage_at_strides_8_and_16():
    assert fused_stages([112, 56, 28, 14, 14, 7, 7], 224) == [2, 4]
    assert fused_stages([7], 224) == [0]  # a single layer: itself


def test_a_map_goes_back_onto_the_image_as_sent():
    heat = np.zeros((64, 64), np.float32)
    heat[16:48] = 1.0  # a 200 x 100 (w x h) image letterboxed into 64: rows 16..47 hold it
    back = unletterbox(heat, (100, 200))
    assert back.shape == (100, 200) and back.min() > 0.9
    assert unletterbox(heat, (30, 50), "resize").shape == (30, 50)
    image = np.random.default_rng(0).random((100, 200)).astype(np.float32)
    png = cv2.imdecode(np.frombuffer(overlay_png(image, back), np.uint8), 1)
    assert png.shape == (100, 200, 3)
    assert np.asarray(heat_grid(heat, 4)).shape == (4, 4)


def test_the_film_overlay_has_the_films_size_and_heat_only_in_the_boxes():
    film = np.full((300, 500), 0.5, np.float32)
    heat = np.ones((64, 64), np.float32)
    square = (-20.0, 50.0, 100.0, 170.0)  # partly beyond the film's left edge
    png = film_overlay_png(film, [(square, (0.0, 60.0, 90.0, 150.0), heat, "KL3")])
    out = cv2.imdecode(np.frombuffer(png, np.uint8), 1)
    assert out.shape == (300, 500, 3)
    grey = np.abs(out.astype(int) - 128).sum(2) < 6
    assert not grey[100, 50] and grey[100, 300] and grey[10, 10]


def test_the_client_offers_the_servers_methods():
    from koa_client.__main__ import EXPLAIN_METHODS

    assert EXPLAIN_METHODS == METHODS
