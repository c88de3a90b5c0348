"""Train the knee-joint finder (`model.localize.KneeFinder`) on annotated whole films and the dataset's crops.

``python -m train.fit_finder --films ../shared/data/legfilms --koa ../shared/data/koa --out runs/finder``
(the shipped finder's recipe: ``--recipe train/recipes/finder.py``). Positives and negatives:
docs/TRAINING.md (`train.fit_finder`).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.localize import VIEWS, FinderConfig, KneeFinder, load_finder, save_finder
from train import framings as framings_module
from train.films import Item, load_films, load_nonknee
from train.finder_views import Hard, augment, fade, load_crops, load_pairs, paste_metal, targets
from train.recipe import parse_args

log = logging.getLogger("train.fit_finder")


# what the annotator noted on films of the kinds the finder found hard (#21): children, hardware, edges
HARD_NOTES = ("child", "infant", "toddler", "hardware", "plate", "edge", "low contrast", "cast")


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
    hard: Hard = Hard(),  # noqa: B008 (a frozen dataclass)
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


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--films", default="../shared/data/legfilms")
    p.add_argument("--boxes", default="annotations/legfilms.csv")
    p.add_argument("--koa", default="../shared/data/koa")
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
    return p


def main(argv: list[str] | None = None) -> Path:
    a = parse_args(get_args_parser(), argv)
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
