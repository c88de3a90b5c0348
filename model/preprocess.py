"""OA-MEN input preprocessing as pure functions: decoded gray array in, model input out.

Fit to the square, Gaussian denoise, Laplacian enhance, equalise, pad and normalise (OA-MEN,
Section 2.2), every parameter from the input contract; training and serving both call it, so the
transform exists once. The steps, and why in that order: docs/MODEL.md, "Preprocessing".
"""

from __future__ import annotations

import cv2
import numpy as np

from model.contract import InputContract, PreprocessConfig

__all__ = [
    "as_float_image",
    "fit_to_square",
    "gaussian_denoise",
    "laplacian_enhance",
    "equalize",
    "pad_to_square",
    "prepare",
    "normalize",
    "to_model_input",
    "preprocess",
]


def as_float_image(image: np.ndarray) -> np.ndarray:
    """A 2-D gray image as float32 in [0, 1].

    Args:
        image: (H, W) array, uint8 (scaled by 255), uint16 (by 65535) or float in [0, 1].
    """
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected a numpy array, got {type(image).__name__}")
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"expected a non-empty 2-D gray image, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if image.dtype == np.uint16:
        return image.astype(np.float32) / 65535.0
    if np.issubdtype(image.dtype, np.floating):
        if not np.all(np.isfinite(image)):
            raise ValueError("image has NaN or infinite values")
        lo, hi = float(image.min()), float(image.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"float images must lie in [0, 1], got range [{lo:.3g}, {hi:.3g}]")
        return image.astype(np.float32, copy=False)
    raise ValueError(f"expected uint8, uint16 or float pixels, got {image.dtype}")


def fit_to_square(image: np.ndarray, size: int, fit: str) -> np.ndarray:
    """Scale an image for a ``size`` x ``size`` input.

    - ``letterbox`` (default): the longer side becomes ``size``, aspect ratio kept; the
      shorter side is padded later by `pad_to_square`. Joint-space narrowing is the key KL
      sign, and a non-uniform resize would stretch or squeeze exactly that distance; a crop
      could cut the joint off. The dataset's 224 x 224 crops pass through unchanged.
    - ``resize``: both sides to ``size`` (distorts non-square images).
    - ``center_crop``: the shorter side becomes ``size`` and the centre square is kept.

    Args:
        image: (H, W) float32 image.
    Returns:
        (h, w) float32 image with max(h, w) == size (letterbox) or h == w == size.
    """
    h, w = image.shape
    if fit == "resize":
        out_h, out_w = size, size
    elif fit in ("letterbox", "center_crop"):
        scale = size / max(h, w) if fit == "letterbox" else size / min(h, w)
        out_h, out_w = max(1, round(h * scale)), max(1, round(w * scale))
    else:
        raise ValueError(f"unknown fit {fit!r}")
    if (out_h, out_w) != (h, w):
        # INTER_AREA averages when shrinking (no aliasing of the trabecular texture);
        # INTER_LINEAR when enlarging.
        shrink = out_h * out_w < h * w
        interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        image = cv2.resize(image, (out_w, out_h), interpolation=interp)
    if fit == "center_crop":
        top, left = (out_h - size) // 2, (out_w - size) // 2
        image = image[top : top + size, left : left + size]
    return np.ascontiguousarray(image, dtype=np.float32)


def gaussian_denoise(image: np.ndarray, ksize: int, sigma: float) -> np.ndarray:
    """Gaussian low-pass filter of a float32 image; ``ksize == 1`` is the identity."""
    if ksize == 1:
        return image
    return cv2.GaussianBlur(image, (ksize, ksize), sigma, borderType=cv2.BORDER_REFLECT_101)


def laplacian_enhance(image: np.ndarray, ksize: int, weight: float) -> np.ndarray:
    """Add the Laplacian edges back to the image: ``out = image - weight * lap(image)``.

    ``ksize == 1`` is the 4-neighbour Laplacian ``[[0, 1, 0], [1, -4, 1], [0, 1, 0]]`` that
    OA-MEN describes (the contract's default); larger odd apertures are OpenCV's Sobel-based
    kernels (3 is ``[[2, 0, 2], [0, -8, 0], [2, 0, 2]]``). The kernel has a negative centre, so
    subtracting it sharpens (the classic ``f - c * lap(f)`` form). Clipped to [0, 1].
    """
    if weight == 0:
        return image
    lap = cv2.Laplacian(image, cv2.CV_32F, ksize=ksize, borderType=cv2.BORDER_REFLECT_101)
    return np.clip(image - weight * lap, 0.0, 1.0)


def equalize(image: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Histogram equalisation of brightness; float32 [0, 1] in, uint8 out.

    For a gray radiograph brightness is the pixel value itself, so equalising it is the
    paper's "brightness space" equalisation without a colour-space round trip.
    """
    u8 = np.round(image * 255.0).astype(np.uint8)
    if cfg.equalization == "global":
        return cv2.equalizeHist(u8)
    if cfg.equalization == "clahe":
        grid = (cfg.clahe_tile_grid, cfg.clahe_tile_grid)
        return cv2.createCLAHE(clipLimit=cfg.clahe_clip_limit, tileGridSize=grid).apply(u8)
    return u8


def pad_to_square(image: np.ndarray, size: int, value: int) -> np.ndarray:
    """Centre a (h, w) uint8 image with h, w <= size on a ``size`` x ``size`` canvas."""
    h, w = image.shape
    if h > size or w > size:
        raise ValueError(f"image {h}x{w} does not fit in {size}x{size}")
    if (h, w) == (size, size):
        return image
    canvas = np.full((size, size), value, dtype=np.uint8)
    top, left = (size - h) // 2, (size - w) // 2
    canvas[top : top + h, left : left + w] = image
    return canvas


def prepare(image: np.ndarray, contract: InputContract) -> np.ndarray:
    """The deterministic, cacheable half: decoded gray image -> (S, S) uint8 image.

    Args:
        image: (H, W) gray image, uint8, uint16 or float in [0, 1].
    Returns:
        (input_size, input_size) uint8 array.
    """
    cfg = contract.preprocess
    x = fit_to_square(as_float_image(image), contract.input_size, cfg.fit)
    x = gaussian_denoise(x, cfg.gaussian_ksize, cfg.gaussian_sigma)
    x = laplacian_enhance(x, cfg.laplacian_ksize, cfg.laplacian_weight)
    x = equalize(x, cfg)
    return pad_to_square(x, contract.input_size, cfg.pad_value)


def normalize(image: np.ndarray, contract: InputContract) -> np.ndarray:
    """(H, W) uint8 -> (C, H, W) float32 scaled to [0, 1] then standardised per channel."""
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"expected a 2-D uint8 image, got {image.dtype} {image.shape}")
    x = image.astype(np.float32) / 255.0
    mean = np.asarray(contract.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(contract.std, dtype=np.float32)[:, None, None]
    return (np.broadcast_to(x, (contract.channels, *x.shape)) - mean) / std


def to_model_input(prepared: np.ndarray, contract: InputContract) -> np.ndarray:
    """The per-call half: a `prepare`d uint8 image -> (C, S, S) float32 network input."""
    s = contract.input_size
    if prepared.shape != (s, s):
        raise ValueError(f"expected a prepared {s}x{s} image, got {prepared.shape}")
    return normalize(prepared, contract)


def preprocess(image: np.ndarray, contract: InputContract) -> np.ndarray:
    """Decoded gray image -> (C, S, S) float32 model input; `prepare` then `to_model_input`."""
    return to_model_input(prepare(image, contract), contract)
