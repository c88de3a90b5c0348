"""Knee crops framed as other hospitals frame them: for the framing tables, the knee gate and the finder.

A site's PACS may send a wide band around a magnified joint (femur and tibia cut close), a tighter or
looser crop, a crop off-centre, both knees side by side, or another contrast, brightness curve,
sharpness, noise or bit depth. `FRAMINGS` names fixed versions for tables (`train.evaluate`);
`random_framing` draws one for training and fitting (`train.calibrate`'s knee gate,
`train.fit_finder`). All work on a float [0, 1] (H, W) image, before the contract's preprocessing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Window:
    """A rectangle of a crop, in its pixels (may reach beyond it: black there)."""

    x0: float
    y0: float
    width: float
    height: float


def cut(image: np.ndarray, w: Window) -> np.ndarray:
    """The pixels of ``w`` (black beyond the image), at the image's own resolution."""
    m = np.float32([[1, 0, -w.x0], [0, 1, -w.y0]])
    size = (max(8, round(w.width)), max(8, round(w.height)))
    return cv2.warpAffine(image, m, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def band_window(h: int, w: int, share: float, zoom: float = 1.0, joint_line: float = 0.555) -> Window:
    """A wide band: ``zoom`` of the crop's width around its centre (below 1: the joint magnified, cut
    at the sides), ``share`` of that width high, around the joint line."""
    ww = w * zoom
    wh = ww * share
    return Window((w - ww) / 2, joint_line * h - wh / 2, ww, wh)


def _band(share: float, zoom: float = 1.0) -> Callable[[np.ndarray], np.ndarray]:
    return lambda im: cut(im, band_window(*im.shape, share, zoom))


def _zoom(share: float) -> Callable[[np.ndarray], np.ndarray]:
    def f(im: np.ndarray) -> np.ndarray:
        h, w = im.shape
        return cut(im, Window(w * (1 - share) / 2, h * (1 - share) / 2, w * share, h * share))

    return f


def _shift(dx: float, dy: float) -> Callable[[np.ndarray], np.ndarray]:
    def f(im: np.ndarray) -> np.ndarray:
        h, w = im.shape
        return cut(im, Window(dx * w, dy * h, w, h))

    return f


def side_by_side(im: np.ndarray) -> np.ndarray:
    """Both knees in one image: the knee and its mirror (a right and a left knee), a gap between."""
    gap = np.zeros((im.shape[0], max(1, im.shape[1] // 10)), im.dtype)
    return np.hstack([im, gap, im[:, ::-1]])


def contrast(im: np.ndarray, k: float) -> np.ndarray:
    """Contrast scaled by ``k`` around the image's mean (k < 1: softer, as some detectors export)."""
    m = float(im.mean())
    return np.clip(m + k * (im - m), 0.0, 1.0)


def sharpen(im: np.ndarray, amount: float) -> np.ndarray:
    """Unsharp masking (amount > 0) or blur toward a smoothed copy (amount < 0)."""
    blur = cv2.GaussianBlur(im, (0, 0), 2.0)
    return np.clip(im + amount * (im - blur), 0.0, 1.0)


def noise(im: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(im + rng.normal(0.0, sigma, im.shape).astype(np.float32), 0.0, 1.0)


def bit_depth(im: np.ndarray, bits: int) -> np.ndarray:
    """The image as a detector of ``bits`` bits would store it."""
    levels = float(2**bits - 1)
    return np.round(im * levels) / levels


@dataclass(frozen=True)
class Framing:
    """A fixed framing for tables: its name, what it is, and what it does to a float [0, 1] image."""

    name: str
    what: str
    apply: Callable[[np.ndarray], np.ndarray]


FRAMINGS: tuple[Framing, ...] = (  # fixed framings for tables
    Framing("original", "the dataset's crop", lambda im: im),
    Framing("joint_band_55", "full width, the central 55% of the height (a wide image, letterboxed)", _band(0.55)),
    Framing(
        "band_magnified",
        "80% of the width around the joint, half as high as wide (femur and tibia cut close)",
        _band(0.5, 0.8),
    ),  # fmt: skip
    Framing("zoom_85", "the central 85% of each side, enlarged back", _zoom(0.85)),
    Framing("loose_120", "a looser crop: 120% of each side, black beyond the crop", _zoom(1.2)),
    Framing("off_centre", "shifted 12% right and 8% down", _shift(0.12, 0.08)),
    Framing("side_by_side", "both knees side by side (the knee and its mirror)", side_by_side),
    Framing("soft_contrast", "contrast 0.6 around the mean", lambda im: contrast(im, 0.6)),
    Framing("gamma_0.7", "brightness curve gamma 0.7", lambda im: np.power(im, 0.7)),
    Framing("gamma_1.4", "brightness curve gamma 1.4", lambda im: np.power(im, 1.4)),
    Framing("sharpened", "unsharp mask, amount 1", lambda im: sharpen(im, 1.0)),
    Framing("noisy", "Gaussian noise, sigma 0.03", lambda im: noise(im, 0.03, np.random.default_rng(0))),
    Framing("bits_6", "6-bit levels", lambda im: bit_depth(im, 6)),
)


def random_window(h: int, w: int, rng: np.random.Generator) -> Window:
    """A framing of a knee crop another site might use: a wide band (magnified or not), a tighter or
    looser crop, off-centre."""
    kind = rng.choice(["band", "zoom", "shift"], p=[0.5, 0.3, 0.2])
    if kind == "band":
        win = band_window(h, w, rng.uniform(0.4, 0.75), rng.uniform(0.65, 1.1), rng.uniform(0.5, 0.6))
    elif kind == "zoom":
        s = rng.uniform(0.7, 1.3)
        win = Window(w * (1 - s) / 2, h * (1 - s) / 2, w * s, h * s * rng.uniform(0.8, 1.1))
    else:
        win = Window(w * rng.uniform(-0.15, 0.15), h * rng.uniform(-0.12, 0.12), w, h)
    return win


def random_photometric(im: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Another detector's look: contrast, brightness curve, sharpness, noise, bit depth."""
    if rng.random() < 0.5:
        im = contrast(im, rng.uniform(0.5, 1.2))
    if rng.random() < 0.5:
        im = np.power(im, rng.uniform(0.6, 1.5))
    if rng.random() < 0.4:
        im = sharpen(im, rng.uniform(-0.8, 1.5))
    if rng.random() < 0.3:
        im = noise(im, rng.uniform(0.005, 0.04), rng)
    if rng.random() < 0.2:
        im = bit_depth(im, int(rng.integers(6, 9)))
    return im.astype(np.float32)


def random_framing(im: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random framing (`random_window`) and look (`random_photometric`) of a float [0, 1] knee
    crop: what the knee gate sees of another site's crop (both knees side by side never reach it:
    the finder cuts them apart)."""
    return random_photometric(cut(im, random_window(*im.shape, rng)), rng)
