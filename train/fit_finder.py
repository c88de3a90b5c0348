"""Train the knee-joint finder (`model.localize.KneeFinder`) on annotated whole films and the dataset's crops.

``python -m train.fit_finder --films ../shared/data/legfilms --boxes annotations/legfilms.csv \\
    --koa ../shared/data/koa --out runs/finder``

Positives: the knee joints boxed in ``annotations/legfilms.csv`` (films of the ``train`` part of
`film_split`) and crops of the dataset's train split, whose joint is where `model.localize` says
the training crops put it. Negatives: the annotated films without a knee (ankles, shafts, feet)
and the rest of every film. The ``tune`` films choose the score threshold; the ``test`` films are
only measured (`train.eval_finder`). Never the non-knee radiographs: they measure refusals.
"""

from __future__ import annotations

import argparse
import hashlib
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
    save_finder,
)
from train.annotate import read_boxes
from train.data import scan

log = logging.getLogger("train.fit_finder")


def film_split(name: str) -> str:
    """A film's part, fixed by its name: a third ``test``, a sixth ``tune``, the rest ``train``."""
    h = int(hashlib.sha1(name.encode()).hexdigest(), 16)
    return "test" if h % 3 == 0 else "tune" if h % 6 == 1 else "train"


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


def augment(
    item: Item, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[tuple[float, float, float, int]]]:
    """A random window of the source (the whole film, or part of it as another clinic would frame
    it), its brightness changed, then the finder's own input transform; flips and small turns."""
    gray = item.gray
    h, w = gray.shape
    if item.kind == "crop":
        # the crop a little zoomed in or out, shifted (tighter and wider framings than ours)
        z = rng.uniform(0.8, 1.5)
        ww, wh = w * z, h * z * rng.uniform(0.75, 1.1)
    elif rng.random() < 0.4:
        ww, wh = w, h
    else:
        ww, wh = w * rng.uniform(0.45, 1.0), h * rng.uniform(0.45, 1.0)
    x0 = rng.uniform(min(0.0, w - ww), max(0.0, w - ww))
    y0 = rng.uniform(min(0.0, h - wh), max(0.0, h - wh))
    iw, ih = max(8, round(ww)), max(8, round(wh))
    m = np.float32([[1, 0, -x0], [0, 1, -y0]])
    window = cv2.warpAffine(gray, m, (iw, ih), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
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
    net: KneeFinder, items: list[Item], size: int, copies: int, rng: np.random.Generator, batch: int = 32
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
            x, joints = augment(item, size, rng)
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
    p.add_argument("--films", default="../shared/data/legfilms")
    p.add_argument("--boxes", default="annotations/legfilms.csv")
    p.add_argument("--koa", default="../shared/data/koa")
    p.add_argument("--out", default="runs/finder")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--film-copies", type=int, default=8, help="random views of each training film")
    p.add_argument("--crops", type=int, default=600, help="dataset crops (one random view each)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--input-size", type=int, default=FinderConfig.input_size)
    p.add_argument("--version", default="1.0.0")
    p.add_argument("--seed", type=int, default=0)
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
    parts = [augmented_features(net, films, a.input_size, a.film_copies, rng)]
    parts.append(augmented_features(net, crops, a.input_size, 1, rng))
    f8s, f16s, heats, regs = (torch.cat(t) for t in zip(*parts, strict=True))
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
    path = save_finder(out / "finder.pt", net, cfg, epochs=len(history))
    log.info("wrote %s", path)
    return path


if __name__ == "__main__":
    main()
