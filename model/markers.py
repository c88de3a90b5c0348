"""Burned-in laterality markers: the R or L that a lead marker or the modality prints on a film.

``candidates`` finds letter-sized bright marks, ``MarkerNet`` reads each (R, L, mirrored, or none) and
claims a letter only above its saved threshold; ``assign`` gives each graded knee its side. How, and
where the figures are: docs/MODEL.md, "Laterality markers".
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

__all__ = [
    "CLASSES",
    "Marker",
    "MarkerConfig",
    "MarkerNet",
    "MarkerReader",
    "assign",
    "candidates",
    "load_reader",
    "patches",
    "read_markers",
]

# Index 0 is "not a letter"; a mirrored letter still names its side.
CLASSES = ("other", "R", "L", "R_mirrored", "L_mirrored")
LETTER = {1: "R", 2: "L", 3: "R", 4: "L"}


@dataclass(frozen=True)
class MarkerConfig:
    """What the reader's weights expect; saved with them (`save_reader`)."""

    patch: int = 24  # the classifier's input side, pixels
    margin: float = 1.3  # patch side = margin x the component's longer side
    min_height: int = 8  # pixels: a smaller letter cannot be read reliably
    min_height_frac: float = 0.012  # of the film's longer side
    max_height_frac: float = 0.09
    min_aspect: float = 0.3  # width / height of the component's box
    max_aspect: float = 1.4
    min_fill: float = 0.2  # component area / box area
    max_fill: float = 0.85
    min_level: int = 150  # grey level a letter reaches (uint8)
    min_tophat: int = 50  # how far it stands out of its neighbourhood (grey levels)
    tophat_frac: float = 0.055  # top-hat square side, of the film's longer side
    max_candidates: int = 64  # the brightest-contrast ones are kept: bounds the cost per film
    threshold: float = 0.99  # probability of the letter's class needed to claim it
    classes: tuple[str, ...] = field(default=CLASSES)

    @classmethod
    def from_dict(cls, d: dict) -> MarkerConfig:
        d = dict(d)
        if "classes" in d:
            d["classes"] = tuple(d["classes"])
        return cls(**d)


@dataclass(frozen=True)
class Marker:
    """A letter read on a film: ``letter`` R or L, its box (x0, y0, x1, y1) in the film's pixels."""

    letter: str
    box: tuple[int, int, int, int]
    mirrored: bool
    score: float

    @property
    def centre_x(self) -> float:
        return (self.box[0] + self.box[2]) / 2


class MarkerNet(nn.Module):
    """Patch (N, 1, 24, 24) in [0, 1] -> logits (N, 5) over ``CLASSES``; about 7k parameters."""

    def __init__(self, num_classes: int = len(CLASSES)) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(1, 8), block(8, 16), block(16, 32))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(32 * 3 * 3, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


MarkerReader = tuple[MarkerNet, MarkerConfig]


def candidates(gray: np.ndarray, cfg: MarkerConfig) -> list[tuple[int, int, int, int]]:
    """Boxes (x0, y0, x1, y1), x1/y1 exclusive, of the components that could be a marker letter.

    Args:
        gray: (H, W) uint8 film.
    """
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"candidates wants a (H, W) uint8 image, got {gray.shape} {gray.dtype}")
    longer = max(gray.shape)
    k = max(3, int(round(cfg.tophat_frac * longer)) | 1)
    tophat = cv2.morphologyEx(gray, cv2.MORPH_TOPHAT, cv2.getStructuringElement(cv2.MORPH_RECT, (k, k)))
    mask = ((gray >= cfg.min_level) & (tophat >= cfg.min_tophat)).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    lo = max(cfg.min_height, cfg.min_height_frac * longer)
    hi = cfg.max_height_frac * longer
    kept = []
    for x, y, w, h, area in stats[1:]:
        if not lo <= h <= hi or not cfg.min_aspect <= w / h <= cfg.max_aspect:
            continue
        if not cfg.min_fill <= area / (w * h) <= cfg.max_fill:
            continue
        kept.append((int(x), int(y), int(x + w), int(y + h)))
    if len(kept) > cfg.max_candidates:
        contrast = [float(tophat[y0:y1, x0:x1].max()) for x0, y0, x1, y1 in kept]
        order = np.argsort(contrast)[::-1][: cfg.max_candidates]
        kept = [kept[i] for i in sorted(order)]
    return kept


def patches(gray: np.ndarray, boxes: list[tuple[int, int, int, int]], cfg: MarkerConfig) -> np.ndarray:
    """(N, 1, P, P) float32 patches in [0, 1], one square per box, centred on it, stretched min to max."""
    out = np.zeros((len(boxes), 1, cfg.patch, cfg.patch), np.float32)
    h, w = gray.shape
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        side = max(4, int(round(max(x1 - x0, y1 - y0) * cfg.margin)) + 2)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        a, b = cx - side // 2, cy - side // 2
        crop = np.zeros((side, side), np.uint8)
        sx0, sy0, sx1, sy1 = max(a, 0), max(b, 0), min(a + side, w), min(b + side, h)
        crop[sy0 - b : sy1 - b, sx0 - a : sx1 - a] = gray[sy0:sy1, sx0:sx1]
        p = cv2.resize(crop, (cfg.patch, cfg.patch), interpolation=cv2.INTER_AREA).astype(np.float32)
        lo, hi = float(p.min()), float(p.max())
        out[i, 0] = (p - lo) / max(hi - lo, 1.0)
    return out


@torch.no_grad()
def classify(net: MarkerNet, x: np.ndarray) -> np.ndarray:
    """Class probabilities (N, 5) for patches (N, 1, P, P)."""
    if len(x) == 0:
        return np.zeros((0, len(CLASSES)), np.float32)
    return torch.softmax(net(torch.from_numpy(x)), dim=1).numpy()


def read_markers(reader: MarkerReader, gray: np.ndarray, threshold: float | None = None) -> list[Marker]:
    """The letters claimed on a film: every candidate whose letter class reaches the threshold.

    Args:
        gray: (H, W) film, uint8 or float in [0, 1] (as `model.decode` gives it).
        threshold: instead of the one saved with the weights (measurements only).
    """
    net, cfg = reader
    thr = cfg.threshold if threshold is None else threshold
    if gray.dtype != np.uint8:  # model.decode's float32 in [0, 1]
        gray = (np.clip(gray, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    boxes = candidates(gray, cfg)
    probs = classify(net, patches(gray, boxes, cfg))
    found = []
    for box, p in zip(boxes, probs, strict=True):
        c = int(p.argmax())
        if c != 0 and p[c] >= thr:
            found.append(Marker(LETTER[c], box, c >= 3, float(p[c])))
    return found


def assign(markers: list[Marker], knees_x: list[float], width: int) -> list[str | None]:
    """Laterality per knee found on a film (given by its centre x, in the film's pixels) from its markers.

    One knee on the film: the markers' letter when they all agree, else None. Several knees (graded or
    not: a refused knee beside a marker still owns it): a knee gets a letter only when it is the only
    knee in its half of the film and the markers in that half all agree; a marker in the other half
    says nothing about it.
    """
    if not markers or not knees_x:
        return [None] * len(knees_x)
    if len(knees_x) == 1:
        letters = {m.letter for m in markers}
        return [letters.pop() if len(letters) == 1 else None]
    half = width / 2
    out: list[str | None] = []
    for x in knees_x:
        right_half = x >= half
        if sum((k >= half) == right_half for k in knees_x) != 1:
            out.append(None)
            continue
        letters = {m.letter for m in markers if (m.centre_x >= half) == right_half}
        out.append(letters.pop() if len(letters) == 1 else None)
    return out


def save_reader(net: MarkerNet, cfg: MarkerConfig, path: str | Path) -> None:
    state = {"model": net.state_dict(), "config": json.dumps(asdict(cfg))}
    torch.save(state, Path(path))


def load_reader(path: str | Path) -> MarkerReader | None:
    """The reader from its weights file, or None when there is none (then no marker is read)."""
    if not Path(path).is_file():
        return None
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    cfg = MarkerConfig.from_dict(json.loads(state["config"]))
    net = MarkerNet(len(cfg.classes))
    net.load_state_dict(state["model"])
    return net.eval(), cfg
