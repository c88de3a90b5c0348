"""The annotated leg films: the knee boxes, the fixed film and non-knee splits, films loaded as `Item`s.

Shared by the finder's training and measurement (`train.fit_finder`, `train.eval_finder`,
`train.tune_finder`), the marker reader's (`train.fit_markers`) and the knee gate's tune films
(`train.knee_gate`). The box convention is in ``annotations/legfilms.csv`` and docs/FILMS.md.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

COLUMNS = ["file", "width", "height", "view", "x0", "y0", "x1", "y1", "marker", "note"]


@dataclass(frozen=True)
class JointBox:
    """An annotated knee joint in its image's own pixels: the centre, the width, the view (`view_index`)."""

    cx: float
    cy: float
    width: float
    view: int  # 0: AP/PA, 1: lateral or oblique


@dataclass
class Item:
    """A source image and its annotated joints."""

    name: str
    gray: np.ndarray
    joints: list[JointBox]
    kind: str  # "film" or "crop"
    note: str = ""  # what the annotator noted


def view_index(view: str) -> int:
    return 0 if view == "ap" else 1


def read_boxes(path: str | Path) -> dict[str, list[dict]]:
    """file -> list of rows (a film without a knee has one row with view 'none')."""
    out: dict[str, list[dict]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(line for line in f if not line.startswith("#")):
            for k in ("width", "height"):
                row[k] = int(row[k])
            row["box"] = [float(row[k]) for k in ("x0", "y0", "x1", "y1")] if row["x0"] else None
            out.setdefault(row["file"], []).append(row)
    return out


def load_films(films: str | Path, boxes: str | Path, part: str | None) -> list[Item]:
    items = []
    for name, rows in sorted(read_boxes(boxes).items()):
        if part is not None and film_split(name) != part:
            continue
        gray = cv2.imread(str(Path(films) / name), cv2.IMREAD_GRAYSCALE)
        if gray is None:
            raise FileNotFoundError(Path(films) / name)
        joints = []
        for r in rows:
            if r["box"] is not None and r["view"] != "none":
                x0, y0, x1, y1 = r["box"]
                joints.append(JointBox((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, view_index(r["view"])))
        note = "; ".join(dict.fromkeys(r["note"] for r in rows if r.get("note")))
        items.append(Item(name, gray, joints, "film", note))
    return items


def film_split(name: str) -> str:
    """A film's part, fixed by its name: a third ``test``, a sixth ``tune``, the rest ``train``."""
    h = int(hashlib.sha1(name.encode()).hexdigest(), 16)
    return "test" if h % 3 == 0 else "tune" if h % 6 == 1 else "train"


def nonknee_split(name: str) -> str:
    """A non-knee radiograph's half, fixed by its file name (not its folder): ``fit`` (may be trained
    on and used to choose the threshold) when the sha1 of the name is even, else ``heldout`` (only
    measured)."""
    h = int(hashlib.sha1(Path(name).name.encode()).hexdigest(), 16)
    return "fit" if h % 2 == 0 else "heldout"


def nonknee_files(folder: str | Path, part: str | None = None) -> list[Path]:
    """The non-knee radiographs under ``folder`` (all, or one half of `nonknee_split`), sorted."""
    files = sorted(f for f in Path(folder).rglob("*") if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return [f for f in files if part is None or nonknee_split(f.name) == part]


def load_nonknee(folder: str | Path, part: str | None) -> list[Item]:
    """Non-knee radiographs as films without a joint (all-zero heatmap targets)."""
    items = []
    for f in nonknee_files(folder, part):
        gray = cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)
        if gray is None:
            raise FileNotFoundError(f)
        items.append(Item(str(f.relative_to(folder)), gray, [], "film", "non-knee"))
    return items
