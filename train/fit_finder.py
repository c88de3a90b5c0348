"""Train the knee-joint finder (`model.localize.KneeFinder`) on annotated whole films and the dataset's crops.

``python -m train.fit_finder --films ../shared/data/legfilms --boxes annotations/legfilms.csv \\
    --koa ../shared/data/koa --out runs/finder``

Positives: the knee joints boxed in ``annotations/legfilms.csv`` (films of the ``train`` part of
`film_split`) and crops of the dataset's train split, whose joint is where `model.localize` says
the training crops put it. Negatives: the annotated films without a knee (ankles, shafts, feet)
and the rest of every film. The ``tune`` films choose the score threshold; the ``test`` films are
only measured (`train.eval_finder`). The non-knee radiographs (hand, hip, shoulder) are split by
name (`nonknee_split`): with ``--nonknee``, views of the ``fit`` half are negatives (no joint) and
that half helps choose the threshold; the ``heldout`` half is only measured (refusals).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import logging
import math
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.localize import (
    JOINT_LINE_IN_CROP,
    JOINT_WIDTH_IN_CROP,
    STRIDE,
    VIEWS,
    FinderConfig,
    KneeFinder,
    finder_input,
    load_finder,
    save_finder,
)
from model.paths import KOA, LEGFILMS
from train import framings as framings_module
from train.annotate import read_boxes
from train.data import scan
from train.framings import random_photometric, random_window

log = logging.getLogger("train.fit_finder")


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


# what the annotator noted on films of the kinds the finder found hard (#21): children, hardware, edges
HARD_NOTES = ("child", "infant", "toddler", "hardware", "plate", "edge", "low contrast", "cast")


def view_index(view: str) -> int:
    return 0 if view == "ap" else 1


@dataclass
class Item:
    """A source image and its joints as (cx, cy, width, view index) in its own pixels."""

    name: str
    gray: np.ndarray
    joints: list[tuple[float, float, float, int]]
    kind: str  # "film" or "crop"
    note: str = ""  # what the annotator noted


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
                joints.append(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, view_index(r["view"])))
        note = "; ".join(dict.fromkeys(r["note"] for r in rows if r.get("note")))
        items.append(Item(name, gray, joints, "film", note))
    return items


def crop_joint_of(gray: np.ndarray) -> tuple[float, float, float, int]:
    """Where the dataset's crops put the joint (see `model.localize`)."""
    h, w = gray.shape
    return w / 2, JOINT_LINE_IN_CROP * h, JOINT_WIDTH_IN_CROP * w, 0


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
        cx, cy, jw, v = crop_joint_of(a.gray)
        out.append(Item(f"{a.name}+{b.name}", gray, [(cx, cy, jw, v), (cx + w + w // 10, cy, jw, v)], "pair"))
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


def paste_metal(window: np.ndarray, joints: list[tuple[float, float, float, int]], rng: np.random.Generator) -> None:
    """Draw saturated metal into ``window`` (uint8, in place): a plate along the bone above or below a
    joint with screws across it, a row of skin staples, or a row of screw heads; sized by the joint (or,
    without one, by the window)."""
    h, w = window.shape
    if joints:
        cx, cy, jw, _ = joints[int(rng.integers(len(joints)))]
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
) -> tuple[np.ndarray, list[tuple[float, float, float, int]]]:
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
        cx, cy, jw, _ = item.joints[int(rng.integers(len(item.joints)))]
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
        paste_metal(window, [(cx - x0, cy - y0, jw, v) for cx, cy, jw, v in item.joints], rng)
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
    for cx, cy, jw, v in item.joints:
        jx, jy = (cx - x0) * lb.scale + lb.left, (cy - y0) * lb.scale + lb.top
        if 0 <= cx - x0 < iw and 0 <= cy - y0 < ih:  # centre inside the window
            joints.append((jx, jy, jw * lb.scale, v))
    # small turn and flip in input space
    angle = rng.uniform(-10, 10)
    flip = rng.random() < 0.5
    rot = cv2.getRotationMatrix2D((size / 2, size / 2), angle, 1.0)
    x = cv2.warpAffine(x, rot, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=-1.0)
    out = []
    for jx, jy, jw, v in joints:
        px, py = rot @ np.array([jx, jy, 1.0])
        if flip:
            px = size - px
        if 0 <= px < size and 0 <= py < size:
            out.append((float(px), float(py), jw, v))
    if flip:
        x = x[:, ::-1]
    x = x + rng.normal(0, rng.uniform(0, 0.05), x.shape).astype(np.float32)
    return np.ascontiguousarray(x, dtype=np.float32), out


def targets(joints: list[tuple[float, float, float, int]], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(len(VIEWS), G, G) Gaussian centre heatmaps; (4, G, G) regression: mask, log width, offsets."""
    g = size // STRIDE
    heat = np.zeros((len(VIEWS), g, g), np.float32)
    reg = np.zeros((4, g, g), np.float32)
    ys, xs = np.mgrid[0:g, 0:g].astype(np.float32)
    for cx, cy, w, v in joints:
        gx, gy = cx / STRIDE, cy / STRIDE
        ix, iy = min(g - 1, int(gx)), min(g - 1, int(gy))
        sigma = max(0.8, w / STRIDE / 6.0)
        blob = np.exp(-((xs - (ix + 0.5)) ** 2 + (ys - (iy + 0.5)) ** 2) / (2 * sigma**2))
        heat[v] = np.maximum(heat[v], blob)
        heat[v, iy, ix] = 1.0
        reg[:, iy, ix] = (1.0, math.log(max(w, 1.0) / size), gx - ix, gy - iy)
    return heat, reg


def focal_loss(logits: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, per positive."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = heat.eq(1.0).float()
    pos_loss = -torch.log(p) * (1 - p) ** 2 * pos
    neg_loss = -torch.log(1 - p) * p**2 * (1 - heat) ** 4 * (1 - pos)
    return (pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1.0)


def loss_fn(out: torch.Tensor, heat: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    k = len(VIEWS)
    mask = reg[:, 0:1]
    n = mask.sum().clamp(min=1.0)
    size_l = (F.l1_loss(out[:, k : k + 1], reg[:, 1:2], reduction="none") * mask).sum() / n
    off = torch.sigmoid(out[:, k + 1 : k + 3])
    off_l = (F.l1_loss(off, reg[:, 2:4], reduction="none") * mask).sum() / n
    return focal_loss(out[:, :k], heat) + size_l + off_l


def augmented_features(
    net: KneeFinder,
    items: list[Item],
    size: int,
    copies: int,
    rng: np.random.Generator,
    batch: int = 32,
    hard: Hard = Hard(),
    framings: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``copies`` random views of every item through the finder's ImageNet layers, once.

    Those layers keep their weights, so their output can be computed before training: each epoch
    then only runs the small detection part. Returns float16 stride-8 and stride-16 features,
    heatmaps and regression targets."""
    f8s, f16s, heats, regs = [], [], [], []
    jobs = [item for item in items for _ in range(copies)]
    for i in tqdm(range(0, len(jobs), batch), desc="augment + frozen layers", dynamic_ncols=True):
        xs = []
        for item in jobs[i : i + batch]:
            x, joints = augment(item, size, rng, hard, framings)
            h, r = targets(joints, size)
            xs.append(x)
            heats.append(h)
            regs.append(r)
        with torch.no_grad():
            f8, f16 = net.backbone(torch.from_numpy(np.stack(xs))[:, None])
        f8s.append(f8.half())
        f16s.append(f16.half())
    return torch.cat(f8s), torch.cat(f16s), torch.from_numpy(np.stack(heats)), torch.from_numpy(np.stack(regs))


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--films", default=str(LEGFILMS))
    p.add_argument("--boxes", default="annotations/legfilms.csv")
    p.add_argument("--koa", default=str(KOA))
    p.add_argument("--out", default="runs/finder")
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--film-copies", type=int, default=16, help="random views of each training film")
    p.add_argument(
        "--rare-copies",
        type=int,
        default=0,
        help="extra views of each training film whose note names a rare kind (HARD_NOTES)",
    )
    p.add_argument("--metal", type=float, default=0.0, help="share of film views with synthetic metal (Hard)")
    p.add_argument("--edge", type=float, default=0.0, help="share of film views with a joint at the edge (Hard)")
    p.add_argument("--faint", type=float, default=0.0, help="share of film views washed out (Hard)")
    p.add_argument(
        "--nonknee",
        default=None,
        help="folder of non-knee radiographs: views of its fit half (nonknee_split) are negatives",
    )
    p.add_argument("--nonknee-copies", type=int, default=8, help="random views of each fit-half non-knee radiograph")
    p.add_argument("--crops", type=int, default=600, help="dataset crops (one random view each)")
    p.add_argument(
        "--framings",
        type=float,
        default=0.0,
        help="share of the crops' views framed as other sites frame knees (train.framings); with it, "
        "as many extra views of the crops again, and --crops // 4 pairs of knees side by side",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--input-size", type=int, default=FinderConfig.input_size)
    p.add_argument("--version", default="1.0.0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default=None, help="start from this finder file's trained part (fine-tuning)")
    p.add_argument(
        "--cache", default="cache", help="keep the frozen features of the views here (keyed by what drew them)"
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    films = load_films(a.films, a.boxes, "train")
    crops = load_crops(a.koa, "train", a.crops, a.seed)
    log.info("%d training films (%d joints), %d crops", len(films), sum(len(f.joints) for f in films), len(crops))
    net = KneeFinder(pretrained=True)
    frozen = (net.stem, net.to8, net.to16)  # ImageNet's features serve as they are
    for m in frozen:
        m.requires_grad_(False)
        m.eval()
    hard = Hard(metal=a.metal, edge=a.edge, faint=a.faint)
    rare = [f for f in films if any(k in f.note for k in HARD_NOTES)]
    log.info("%d training films of a rare kind (%s), %d extra views each", len(rare), ", ".join(HARD_NOTES),
             a.rare_copies)  # fmt: skip
    # the views' frozen features, drawn once per setting: keyed by everything that draws them (the films,
    # the crops, the counts, the hard shares, the seed, the input size and the augmentation's code)
    key = hashlib.sha1(json.dumps([
        [f.name for f in films], [c.name for c in crops], a.film_copies, a.rare_copies, a.input_size, a.seed,
        [hard.metal, hard.edge, hard.faint], inspect.getsource(augment), inspect.getsource(paste_metal),
        inspect.getsource(fade), inspect.getsource(targets),
    ] + ([a.framings, inspect.getsource(framings_module), inspect.getsource(load_pairs)] if a.framings else [])
    ).encode()).hexdigest()[:16]  # fmt: skip
    cached = Path(a.cache) / f"finder-views-{key}.pt" if a.cache else None
    if cached is not None and cached.is_file():
        f8s, f16s, heats, regs = torch.load(cached, weights_only=True)
        log.info("frozen features of %d views from %s", len(f8s), cached)
    else:
        parts = [augmented_features(net, films, a.input_size, a.film_copies, rng, hard=hard)]
        if rare and a.rare_copies:
            parts.append(augmented_features(net, rare, a.input_size, a.rare_copies, rng, hard=hard))
        parts.append(augmented_features(net, crops, a.input_size, 1, rng))
        if a.framings:
            # other sites' framings of the same knees, and pairs of knees side by side
            frng = np.random.default_rng([a.seed, 2])
            parts.append(augmented_features(net, crops, a.input_size, 1, frng, framings=a.framings))
            pairs = load_pairs(crops[: a.crops // 2])
            parts.append(augmented_features(net, pairs, a.input_size, 1, frng, framings=a.framings))
        f8s, f16s, heats, regs = (torch.cat(t) for t in zip(*parts, strict=True))
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.save((f8s, f16s, heats, regs), cached)
    if a.nonknee:
        # negatives: the fit half of the non-knee radiographs, drawn (and cached) apart from the views
        # above so that those stay what they were without them
        negatives = load_nonknee(a.nonknee, "fit")
        log.info("%d fit-half non-knee radiographs as negatives, %d views each", len(negatives), a.nonknee_copies)
        nkey = hashlib.sha1(json.dumps([
            key, [f.name for f in negatives], a.nonknee_copies,
        ]).encode()).hexdigest()[:16]  # fmt: skip
        ncached = Path(a.cache) / f"finder-nonknee-views-{nkey}.pt" if a.cache else None
        if ncached is not None and ncached.is_file():
            neg = torch.load(ncached, weights_only=True)
        else:
            nrng = np.random.default_rng([a.seed, 1])
            neg = augmented_features(net, negatives, a.input_size, a.nonknee_copies, nrng, hard=hard)
            if ncached is not None:
                torch.save(neg, ncached)
        f8s, f16s, heats, regs = (torch.cat(t) for t in zip((f8s, f16s, heats, regs), neg, strict=True))
    if a.init:
        start, _ = load_finder(a.init)
        net.load_state_dict(start.state_dict())
        log.info("trained part starts from %s", a.init)
    params = [q for q in net.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(f8s) / a.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, a.lr, total_steps=a.epochs * steps_per_epoch, pct_start=0.1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0, history = time.monotonic(), []
    for epoch in range(a.epochs):
        net.train()
        for m in frozen:
            m.eval()
        order = torch.randperm(len(f8s))
        total, n = 0.0, 0
        bar = tqdm(range(0, len(order), a.batch_size), desc=f"epoch {epoch}", dynamic_ncols=True)
        for i in bar:
            idx = order[i : i + a.batch_size]
            loss = loss_fn(net.detect(f8s[idx].float(), f16s[idx].float()), heats[idx], regs[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total, n = total + loss.item(), n + 1
            bar.set_postfix(loss=f"{total / n:.3f}")
        history.append({"epoch": epoch, "loss": total / max(n, 1), "minutes": (time.monotonic() - t0) / 60})
        log.info("epoch %d loss %.4f (%.1f min)", epoch, total / max(n, 1), history[-1]["minutes"])
    net.eval()
    cfg = replace(FinderConfig(), input_size=a.input_size, version=a.version)
    (out / "history.json").write_text(json.dumps(history, indent=2))
    keys = ("epochs", "lr", "film_copies", "rare_copies", "crops", "framings", "metal", "edge", "faint", "seed", "init")
    keys += ("nonknee", "nonknee_copies") if a.nonknee else ()
    trained = {k: getattr(a, k) for k in keys}
    path = save_finder(out / "finder.pt", net, cfg, epochs=len(history), trained=json.dumps(trained))
    log.info("wrote %s", path)
    return path


if __name__ == "__main__":
    main()
