"""train.framings: the framings other sites use, on small hand-checkable images."""

from __future__ import annotations

import numpy as np
import pytest

from train.framings import (
    FRAMINGS,
    Window,
    band_window,
    bit_depth,
    contrast,
    cut,
    random_framing,
    side_by_side,
)


def ramp(h: int = 100, w: int = 120) -> np.ndarray:
    return np.tile(np.linspace(0.1, 0.9, w, dtype=np.float32), (h, 1))


def test_cut_keeps_pixels_inside_and_blacks_out_beyond() -> None:
    im = ramp()
    out = cut(im, Window(-10, 0, 50, 40))
    assert out.shape == (40, 50)
    assert np.all(out[:, :10] == 0) and np.allclose(out[:, 10:], im[:40, :40], atol=1e-6)


def test_band_window_is_a_wide_band_around_the_joint_line() -> None:
    w = band_window(224, 224, share=0.5, zoom=0.8, joint_line=0.555)
    assert w.width == pytest.approx(0.8 * 224) and w.height == pytest.approx(0.5 * w.width)
    assert w.y0 + w.height / 2 == pytest.approx(0.555 * 224)  # centred on the joint line
    assert w.x0 == pytest.approx(0.1 * 224)  # centred across


def test_side_by_side_holds_the_knee_and_its_mirror() -> None:
    im = ramp(20, 30)
    out = side_by_side(im)
    assert out.shape == (20, 30 + 3 + 30)
    assert np.array_equal(out[:, :30], im) and np.array_equal(out[:, -30:], im[:, ::-1])


def test_photometric_framings_stay_in_range_and_do_what_they_say() -> None:
    im = ramp()
    soft = contrast(im, 0.5)
    assert soft.std() == pytest.approx(0.5 * im.std(), rel=1e-4)
    assert len(np.unique(bit_depth(im, 2))) <= 4


def test_every_fixed_framing_gives_a_float_image_in_range() -> None:
    im = ramp(224, 224)
    names = [f.name for f in FRAMINGS]
    assert names[0] == "original" and len(set(names)) == len(names)
    for framing in FRAMINGS:
        name, out = framing.name, framing.apply(im)
        assert out.ndim == 2 and min(out.shape) >= 8, name
        assert out.min() >= 0.0 and out.max() <= 1.0, name


def test_random_framings_differ_and_are_reproducible() -> None:
    im = ramp(224, 224)
    a = [random_framing(im, np.random.default_rng(s)) for s in range(8)]
    b = [random_framing(im, np.random.default_rng(s)) for s in range(8)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert len({x.shape for x in a}) > 2  # bands, zooms and shifts give different shapes
