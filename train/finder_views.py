"""Random views of films and crops for training the knee-joint finder, and the hard kinds of film drawn.

`augment` frames a source as a clinic would (or as the hard kinds the finder missed, #21: synthetic
metal, a joint at the film's edge, washed out) and `targets` turns its joints into CenterNet
heatmaps. Used by `train.fit_finder` (training) and `train.tune_finder` (hard variants of the tune films).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from model.localize import JOINT_LINE_IN_CROP, JOINT_WIDTH_IN_CROP, STRIDE, VIEWS, finder_input
from train.data import scan
from train.films import Item, JointBox
from train.framings import random_photometric, random_window


def crop_joint_of(gray: np.ndarray) -> JointBox:
    """Where the dataset's crops put the joint (see `model.localize`)."""
    h, w = gray.shape
    return JointBox(w / 2, JOINT_LINE_IN_CROP * h, JOINT_WIDTH_IN_CROP * w, 0)


def load_crops(koa: str | Path, split: str, n: int, seed: int) -> list[Item]:
    samples = [s for s in scan(koa, 5) if s.split == split]
    random.Random(seed).shuffle(samples)
    out = []
    for s in samples[:n]:
        gray = cv2.imread(str(s.path), cv2.IMREAD_GRAYSCALE)
        out.append(Item(s.path.name, gray, [crop_joint_of(gray)], "crop"))
    return out


def load_pairs(crops: list[Item]) -> list[Item]:
    """Both knees side by side, as some sites send them: consecutive crops in pairs, the second
    mirrored (a left knee beside a right), a small gap between."""
    out = []
    for a, b in zip(crops[0::2], crops[1::2], strict=False):
        h, w = a.gray.shape
        if b.gray.shape != (h, w):
            continue
        gray = np.hstack([a.gray, np.zeros((h, w // 10), a.gray.dtype), b.gray[:, ::-1]])
        j = crop_joint_of(a.gray)
        out.append(Item(f"{a.name}+{b.name}", gray, [j, replace(j, cx=j.cx + w + w // 10)], "pair"))
    return out


@dataclass(frozen=True)
class Hard:
    """Shares of views drawn as the kinds of film the finder found hard (#21): ``metal``, synthetic
    orthopaedic metal (plates with screws, staples, rows of screw heads) pasted over the bone near a
    joint, or anywhere on a film without one; ``edge``, a film's view framed so that one joint sits at
    (or just beyond) the window's edge; ``faint``, washed-out films (fine detail and local contrast
    reduced, uneven exposure). All default to none."""

    metal: float = 0.0
    edge: float = 0.0
    faint: float = 0.0


def paste_metal(window: np.ndarray, joints: list[JointBox], rng: np.random.Generator) -> None:
    """Draw saturated metal into ``window`` (uint8, in place): a plate along the bone above or below a
    joint with screws across it, a row of skin staples, or a row of screw heads; sized by the joint (or,
    without one, by the window)."""
    h, w = window.shape
    if joints:
        j = joints[int(rng.integers(len(joints)))]
        cx, cy, jw = j.cx, j.cy, j.width
    else:
        jw = min(h, w) * rng.uniform(0.1, 0.3)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    level = int(rng.integers(225, 256))
    for _ in range(int(rng.integers(1, 3))):
        kind = rng.choice(["plate", "plate", "staples", "dots"])
        side = rng.choice([-1.0, 1.0])  # femur (above) or tibia (below)
        if kind == "plate":
            length, thick = jw * rng.uniform(0.6, 2.2), jw * rng.uniform(0.07, 0.2)
            px = cx + jw * rng.uniform(-0.5, 0.5)
            near = jw * rng.uniform(-0.05, 0.3)  # the plate's joint end: at the joint line or a little off it
            py = cy + side * (near + length / 2)
            ang = np.deg2rad(rng.uniform(-20, 20))
            d = np.array([np.sin(ang), np.cos(ang)])  # along the bone
            n = np.array([d[1], -d[0]])  # across it
            c = np.array([px, py])
            box = np.array(
                [c + a * d * length / 2 + b * n * thick / 2 for a, b in ((-1, -1), (-1, 1), (1, 1), (1, -1))]
            )
            cv2.fillPoly(window, [np.round(box * 16).astype(np.int32)], level, cv2.LINE_AA, shift=4)
            if rng.random() < 0.5:  # a buttress: the plate widens at its joint end
                e = c - side * d * length / 2
                r = thick * rng.uniform(1.2, 2.5)
                cv2.ellipse(window, (round(e[0]), round(e[1])), (max(1, round(r)), max(1, round(thick))),
                            float(np.rad2deg(-ang)), 0, 360, level, -1, cv2.LINE_AA)  # fmt: skip
            for t in np.linspace(-0.45, 0.45, int(rng.integers(2, 7))):  # screws across the bone
                q = c + t * d * length
                sl = jw * rng.uniform(0.3, 0.9)
                a0, a1 = q - n * sl * rng.uniform(0.1, 0.9), q + n * sl
                cv2.line(window, tuple(np.round(a0).astype(int)), tuple(np.round(a1).astype(int)), level,
                         max(1, round(thick * rng.uniform(0.25, 0.5))), cv2.LINE_AA)  # fmt: skip
        elif kind == "staples":
            x0, y0 = cx + jw * rng.uniform(-0.8, 0.8), cy + jw * rng.uniform(-1.5, 1.5)
            ang = rng.uniform(0, np.pi)
            step, sz = jw * rng.uniform(0.08, 0.2), max(2, round(jw * rng.uniform(0.04, 0.1)))
            for k in range(int(rng.integers(4, 14))):
                x, y = x0 + k * step * np.sin(ang), y0 + k * step * np.cos(ang)
                cv2.line(window, (round(x - sz), round(y)), (round(x + sz), round(y)), level, max(1, sz // 3))
        else:  # screw heads end-on: a row of bright dots
            x0, y0 = cx + jw * rng.uniform(-0.5, 0.5), cy + side * jw * rng.uniform(0.1, 1.2)
            ang = rng.uniform(-0.4, 0.4)
            step, r = jw * rng.uniform(0.1, 0.25), max(1, round(jw * rng.uniform(0.03, 0.08)))
            for k in range(int(rng.integers(2, 7))):
                x, y = x0 + k * step * np.sin(ang), y0 + side * k * step * np.cos(ang)
                cv2.circle(window, (round(x), round(y)), r, level, -1, cv2.LINE_AA)


def fade(window: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A washed-out film: local contrast flattened toward a blurred copy, uneven exposure, blur."""
    f = window.astype(np.float32)
    k = rng.uniform(0.3, 0.7)
    base = cv2.GaussianBlur(f, (0, 0), max(2.0, 0.08 * max(f.shape)))
    f = base + k * (f - base)
    h, w = f.shape
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(ang) * gx / w + np.sin(ang) * gy / h) * rng.uniform(0, 60)
    f = f + ramp - ramp.mean()
    if rng.random() < 0.5:
        f = cv2.GaussianBlur(f, (0, 0), rng.uniform(0.8, 2.0))
    return np.clip(f, 0, 255).astype(np.uint8)


def augment(
    item: Item, size: int, rng: np.random.Generator, hard: Hard = Hard(), framings: float = 0.0
) -> tuple[np.ndarray, list[JointBox]]:
    """A random window of the source (the whole film, or part of it as another clinic would frame
    it, or, with ``hard.edge``, framed so a joint sits at its edge), its brightness changed (and, with
    ``hard``, metal pasted or contrast washed out), then the finder's own input transform; flips and
    small turns. A ``framings`` share of a crop's views are framed as other sites frame knees
    (`train.framings`)."""
    gray = item.gray
    h, w = gray.shape
    other_site = item.kind == "crop" and rng.random() < framings
    if other_site:
        # another site's framing of the knee (train.framings): a wide band, magnified or not, a tighter
        # or looser crop, off-centre
        win = random_window(h, w, rng)
        ww, wh = win.width, win.height
    elif item.kind == "crop":
        # the crop a little zoomed in or out, shifted (tighter and wider framings than ours)
        z = rng.uniform(0.8, 1.5)
        ww, wh = w * z, h * z * rng.uniform(0.75, 1.1)
    elif rng.random() < 0.4:
        ww, wh = w, h
    else:
        ww, wh = w * rng.uniform(0.45, 1.0), h * rng.uniform(0.45, 1.0)
    x0 = rng.uniform(min(0.0, w - ww), max(0.0, w - ww))
    y0 = rng.uniform(min(0.0, h - wh), max(0.0, h - wh))
    if other_site:
        x0, y0 = win.x0, win.y0
    if item.kind == "film" and item.joints and rng.random() < hard.edge:
        # one joint's centre at most half its width inside an edge of the window (or a little beyond it)
        j = item.joints[int(rng.integers(len(item.joints)))]
        cx, cy, jw = j.cx, j.cy, j.width
        ww, wh = max(ww, 1.5 * jw), max(wh, 1.5 * jw)
        d = jw * rng.uniform(-0.1, 0.5)
        edge = rng.choice(["top", "bottom", "left", "right"], p=[0.4, 0.3, 0.15, 0.15])
        if edge in ("top", "bottom"):
            y0 = cy - d if edge == "top" else cy + d - wh
            x0 = cx - ww * rng.uniform(0.15, 0.85)
        else:
            x0 = cx - d if edge == "left" else cx + d - ww
            y0 = cy - wh * rng.uniform(0.15, 0.85)
    iw, ih = max(8, round(ww)), max(8, round(wh))
    m = np.float32([[1, 0, -x0], [0, 1, -y0]])
    window = cv2.warpAffine(gray, m, (iw, ih), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if rng.random() < hard.metal:
        paste_metal(window, [replace(j, cx=j.cx - x0, cy=j.cy - y0) for j in item.joints], rng)
    if rng.random() < hard.faint:
        window = fade(window, rng)
    if other_site:  # and another detector's look
        window = (random_photometric(window.astype(np.float32) / 255.0, rng) * 255.0).astype(np.uint8)
    g = rng.uniform(0.7, 1.4)
    window = (np.power(window.astype(np.float32) / 255.0, g) * 255.0).astype(np.uint8)
    if rng.random() < 0.3:
        window = cv2.GaussianBlur(window, (0, 0), rng.uniform(0.5, 1.5))
    x, lb = finder_input(window, size)
    joints = []
    for j in item.joints:
        jx, jy = (j.cx - x0) * lb.scale + lb.left, (j.cy - y0) * lb.scale + lb.top
        if 0 <= j.cx - x0 < iw and 0 <= j.cy - y0 < ih:  # centre inside the window
            joints.append(JointBox(jx, jy, j.width * lb.scale, j.view))
    # small turn and flip in input space
    angle = rng.uniform(-10, 10)
    flip = rng.random() < 0.5
    rot = cv2.getRotationMatrix2D((size / 2, size / 2), angle, 1.0)
    x = cv2.warpAffine(x, rot, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=-1.0)
    out = []
    for j in joints:
        px, py = rot @ np.array([j.cx, j.cy, 1.0])
        if flip:
            px = size - px
        if 0 <= px < size and 0 <= py < size:
            out.append(JointBox(float(px), float(py), j.width, j.view))
    if flip:
        x = x[:, ::-1]
    x = x + rng.normal(0, rng.uniform(0, 0.05), x.shape).astype(np.float32)
    return np.ascontiguousarray(x, dtype=np.float32), out


def targets(joints: list[JointBox], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(len(VIEWS), G, G) Gaussian centre heatmaps; (4, G, G) regression: mask, log width, offsets."""
    g = size // STRIDE
    heat = np.zeros((len(VIEWS), g, g), np.float32)
    reg = np.zeros((4, g, g), np.float32)
    ys, xs = np.mgrid[0:g, 0:g].astype(np.float32)
    for j in joints:
        cx, cy, w, v = j.cx, j.cy, j.width, j.view
        gx, gy = cx / STRIDE, cy / STRIDE
        ix, iy = min(g - 1, int(gx)), min(g - 1, int(gy))
        sigma = max(0.8, w / STRIDE / 6.0)
        blob = np.exp(-((xs - (ix + 0.5)) ** 2 + (ys - (iy + 0.5)) ** 2) / (2 * sigma**2))
        heat[v] = np.maximum(heat[v], blob)
        heat[v, iy, ix] = 1.0
        reg[:, iy, ix] = (1.0, math.log(max(w, 1.0) / size), gx - ix, gy - iy)
    return heat, reg


SEED = 20261130


def metal_variant(item: Item, rng: np.random.Generator) -> Item:
    g = item.gray.copy()
    paste_metal(g, item.joints, rng)
    return Item(item.name + "+metal", g, item.joints, item.kind, item.note)


def faint_variant(item: Item, rng: np.random.Generator) -> Item:
    return Item(item.name + "+faint", fade(item.gray, rng), item.joints, item.kind, item.note)


def edge_variants(item: Item, rng: np.random.Generator) -> list[Item]:
    """For each AP joint, the film cut so that the joint's centre is 10-40% of its width inside the
    top, bottom or side edge (the other joints kept where their centres stay inside)."""
    out = []
    h, w = item.gray.shape
    for k, j in enumerate(item.joints):
        cx, cy, jw = j.cx, j.cy, j.width
        if j.view != 0:
            continue
        d = jw * rng.uniform(0.1, 0.4)
        edge = ("top", "bottom", "side")[k % 3 if len(item.joints) > 1 else int(rng.integers(3))]
        x0, y0, x1, y1 = 0, 0, w, h
        if edge == "top":
            y0 = max(0, round(cy - d))
        elif edge == "bottom":
            y1 = min(h, round(cy + d))
        elif cx < w / 2:
            x0 = max(0, round(cx - d))
        else:
            x1 = min(w, round(cx + d))
        joints = [replace(o, cx=o.cx - x0, cy=o.cy - y0) for o in item.joints if x0 <= o.cx < x1 and y0 <= o.cy < y1]
        out.append(Item(f"{item.name}+edge_{edge}", item.gray[y0:y1, x0:x1].copy(), joints, item.kind, item.note))
    return out


def knee_free_windows(item: Item, rng: np.random.Generator, n: int = 4) -> list[Item]:
    """Up to ``n`` windows of the film (30-80% of each side) that no joint box touches: radiographs
    with bone but no knee, half of them with synthetic metal (a proxy for other body parts' films,
    which the finder must refuse; the held-out half of the non-knee radiographs stays unseen)."""
    h, w = item.gray.shape
    out = []
    for k in range(n * 10):
        ww, wh = round(w * rng.uniform(0.3, 0.8)), round(h * rng.uniform(0.3, 0.8))
        x0, y0 = int(rng.integers(0, w - ww + 1)), int(rng.integers(0, h - wh + 1))
        near = [
            x0 < j.cx + j.width and j.cx - j.width < x0 + ww and y0 < j.cy + j.width and j.cy - j.width < y0 + wh
            for j in item.joints
        ]
        if any(near):  # a joint, with a joint's width around it, reaches into the window
            continue
        g = item.gray[y0 : y0 + wh, x0 : x0 + ww].copy()
        if len(out) % 2:
            paste_metal(g, [], rng)
        out.append(Item(f"{item.name}+part{k}", g, [], item.kind, item.note))
        if len(out) == n:
            break
    return out


def hard_variants(tune: list[Item], seed: int = SEED) -> dict[str, list[Item]]:
    rng = np.random.default_rng(seed)
    return {
        "metal": [metal_variant(i, rng) for i in tune for _ in range(2)],
        "edge": [e for i in tune for e in edge_variants(i, rng)],
        "faint": [faint_variant(i, rng) for i in tune],
        "knee_free": [p for i in tune for p in knee_free_windows(i, rng)],
    }
