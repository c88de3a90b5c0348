"""Which feature layers the knee gate reads, and how it combines them: measured without val or real non-knees.

``python -m train.gate_study --run runs/oamen_pt --out docs/model/gate_study.json``
The candidates and what they are measured on: docs/TRAINING.md (`train.gate_study`).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from model.checkpoint import model_from_checkpoint
from model.decode import decode_image
from model.preprocess import as_float_image, prepare, to_model_input
from train.answers import FRAMINGS, made_up_negatives
from train.data import prepare_all, samples_from_files, scan
from train.knee_gate import HARD, fit_gate

log = logging.getLogger("train.gate_study")

COMBINATIONS = {
    "trunk c5 + fused + branch pooled": ("trunk_c5", "fused", "lite_head"),
    "trunk c5 + fused + branch stage 4 + branch pooled": ("trunk_c5", "fused", "lite_b4", "lite_head"),
    "trunk c2-c5 + fused + branch pooled": ("trunk_c2", "trunk_c3", "trunk_c4", "trunk_c5", "fused", "lite_head"),
    "branch stages 0-6 + pooled": tuple(f"lite_b{i}" for i in range(7)) + ("lite_head",),
    "branch stages 4-6 + pooled": ("lite_b4", "lite_b5", "lite_b6", "lite_head"),
    "trunk c4,c5 + branch stages 4-6 + pooled": ("trunk_c4", "trunk_c5", "lite_b4", "lite_b5", "lite_b6", "lite_head"),
    "fused + branch pooled": ("fused", "lite_head"),
    "every layer": tuple(f"trunk_c{i}" for i in range(2, 6))
    + ("fused",)
    + tuple(f"lite_b{i}" for i in range(7))
    + ("lite_head",),
}
RULE = (
    "the highest mean refused share over the made-up negatives that not every candidate refuses (`HARD`: knees "
    "upside down, cut off the joint or rotated, tiles of knees, photographs, ellipse phantoms), each candidate at its "
    "largest tune-fold knee score; among candidates within 0.01 of the highest, the fewest layers"
)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="runs/oamen_pt", help="a train.fit output folder (config.json lists its tune fold)")
    p.add_argument("--out", default="docs/model/gate_study.json")
    p.add_argument("--features", default="cache/gate_study_features.npz", help="cache of the extracted features")
    p.add_argument("--max-gate-fit", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    return p


def made_up_sets(x_tune: np.ndarray, photos: list[Path], contract, r: np.random.Generator) -> dict[str, np.ndarray]:
    """Prepared negatives from tune-fold knees and photographs (`train.answers.made_up_negatives` and more)."""
    size = contract.input_size
    sets = dict(made_up_negatives(x_tune, seed=1))
    sel = r.choice(len(x_tune), 60, replace=False)
    sets["tibia only (joint cut off)"] = np.stack([cv2.resize(k[int(size * 0.6) :], (size, size)) for k in x_tune[sel]])
    sets["knee rotated 90"] = np.stack([np.rot90(k).copy() for k in x_tune[sel]])
    tiles = []
    for _ in range(30):
        small = [cv2.resize(k, (size // 2, size // 2)) for k in x_tune[r.choice(len(x_tune), 4, replace=False)]]
        tiles.append(np.vstack([np.hstack(small[:2]), np.hstack(small[2:])]))
    sets["2x2 tile of knees"] = np.stack(tiles)
    out = []
    for p in photos:
        img = as_float_image(decode_image(p.read_bytes()))
        h, w = img.shape
        out.append(prepare(img, contract))
        for j in range(19):
            s = r.uniform(0.4, 0.9)
            ch, cw = int(h * s), int(w * s)
            t, left = r.integers(0, h - ch + 1), r.integers(0, w - cw + 1)
            crop = img[t : t + ch, left : left + cw]
            crop = crop[::-1] if j % 3 == 1 else crop[:, ::-1] if j % 3 == 2 else crop
            out.append(prepare(np.ascontiguousarray(crop), contract))
    sets["photographs (2 photos, crops)"] = np.stack(out)
    blobs = np.zeros((30, size, size), np.uint8)
    for j in range(30):
        for _ in range(r.integers(2, 6)):
            centre = (int(r.integers(20, 200)), int(r.integers(20, 200)))
            axes = (int(r.integers(10, 60)), int(r.integers(30, 110)))
            cv2.ellipse(blobs[j], centre, axes, float(r.uniform(0, 180)), 0, 360, int(r.integers(120, 255)), -1)
        blobs[j] = cv2.GaussianBlur(blobs[j], (0, 0), 3)
    sets["ellipse phantoms"] = blobs
    return sets


@torch.inference_mode()
def layer_features(net, images: np.ndarray, contract, batch_size: int = 32) -> dict[str, np.ndarray]:
    """(N, S, S) prepared images -> {layer: (N, D)} pooled outputs of every trunk and branch stage."""
    acts: dict[str, torch.Tensor] = {}

    def hook(name):
        def f(_m, _i, o):
            acts[name] = torch.flatten(F.adaptive_avg_pool2d(o.float(), 1), 1)

        return f

    handles = [st.register_forward_hook(hook(f"trunk_c{i + 2}")) for i, st in enumerate(net.stages)]
    handles.append(net.fusion.register_forward_hook(hook("fused")))
    handles += [b.register_forward_hook(hook(f"lite_b{i}")) for i, b in enumerate(net.mobile.net.blocks)]
    out: dict[str, list[np.ndarray]] = {}
    try:
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(
                np.stack([to_model_input(np.ascontiguousarray(im), contract) for im in images[i : i + batch_size]])
            )
            pooled = net.forward_features(x.contiguous(memory_format=torch.channels_last))
            acts["lite_head"] = pooled[:, -net.mobile.out_channels :]
            acts["pooled"] = pooled
            acts["logits"] = net.forward_head(pooled)
            for k, v in acts.items():
                out.setdefault(k, []).append(v.numpy().copy())
    finally:
        for h in handles:
            h.remove()
    return {k: np.concatenate(v) for k, v in out.items()}


def extract(args: argparse.Namespace) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Features of gate-fit knees, tune knees, framed tune knees and made-up negatives, cached."""
    run = Path(args.run)
    config = json.loads((run / "config.json").read_text())
    net, contract = model_from_checkpoint(run / "best.pt")
    net = net.to(memory_format=torch.channels_last)
    samples = scan(config["data"], contract.num_classes)
    tune = samples_from_files(config["tune_files"], samples)
    tune_set = {str(s.path) for s in tune}
    pool = [s for s in samples if s.split == "train" and str(s.path) not in tune_set]
    rng = np.random.default_rng(args.seed)
    gate_fit = [pool[i] for i in sorted(rng.choice(len(pool), min(args.max_gate_fit, len(pool)), False))]
    cache = Path(args.features)
    if cache.is_file():
        z = np.load(cache)
        return {k: z[k] for k in z.files}, np.array([s.grade for s in gate_fit])
    x_tune = prepare_all(tune, contract, "cache", "tune")
    sets = {"tune": x_tune}
    r = np.random.default_rng(2)
    photos = sorted(Path("tests/fixtures/photos").glob("*.jpg"))
    sets |= {f"neg:{k}": v for k, v in made_up_sets(x_tune, photos, contract, r).items()}
    sub = [tune[i] for i in sorted(r.choice(len(tune), 150, replace=False))]
    raw = [as_float_image(decode_image(s.path.read_bytes())) for s in sub]
    for framing in FRAMINGS[1:]:
        sets[f"pos:{framing.name}"] = np.stack([prepare(framing.apply(im), contract) for im in raw])
    sets["gatefit"] = prepare_all(gate_fit, contract, "cache", "gatefit")
    feats = {}
    for name, images in sets.items():
        log.info("features of %s (%d images)", name, len(images))
        feats |= {f"{name}|{k}": v for k, v in layer_features(net, images, contract).items()}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **feats)
    return feats, np.array([s.grade for s in gate_fit])


def study(feats: dict[str, np.ndarray], y_fit: np.ndarray, k: int = 5, seed: int = 0) -> dict[str, Any]:
    sets = sorted({key.split("|")[0] for key in feats} - {"gatefit"})
    layers = sorted({key.split("|")[1] for key in feats} - {"logits"})
    scores: dict[tuple[str, str], np.ndarray] = {}
    for layer in layers:
        means, precision = fit_gate(feats[f"gatefit|{layer}"].astype(np.float64), y_fit, k)
        means, precision = means.astype(np.float64), precision.astype(np.float64)
        for s in sets:
            d = feats[f"{s}|{layer}"].astype(np.float64)[:, None, :] - means[None]
            scores[(s, layer)] = ((d @ precision) * d).sum(-1).min(1)

    def z(layer: str, s: str) -> np.ndarray:
        t = scores[("tune", layer)]
        return (scores[(s, layer)] - t.mean()) / t.std()

    candidates: dict[str, Any] = {}
    for layer in layers:
        candidates[layer] = (lambda s, layer=layer: scores[(s, layer)], [layer])
    for name, ls in COMBINATIONS.items():
        candidates[f"mean z: {name}"] = (lambda s, ls=ls: np.mean([z(x, s) for x in ls], 0), list(ls))
        candidates[f"max z: {name}"] = (lambda s, ls=ls: np.max([z(x, s) for x in ls], 0), list(ls))
    negs = [s for s in sets if s.startswith("neg:")]
    poss = [s for s in sets if s.startswith("pos:")]
    rows = []
    rng = np.random.default_rng(seed)
    halves = [rng.permutation(len(scores[("tune", layers[0])])) for _ in range(200)]
    for name, (f, ls) in candidates.items():
        t = f("tune")
        thr = t.max()
        n = len(t) // 2
        split_half = float(np.mean([(t[h[n:]] > t[h[:n]].max()).mean() for h in halves]))
        refused = {s[4:]: float((f(s) > thr).mean()) for s in negs}
        allneg = np.concatenate([f(s) for s in negs])
        auc = roc_auc_score(np.r_[np.zeros(len(t)), np.ones(len(allneg))], np.r_[t, allneg])
        rows.append({
            "candidate": name,
            "layers": ls,
            "auroc_tune_vs_made_up": float(auc),
            "hard_made_up_refused": float(np.mean([refused[h] for h in HARD])),
            "made_up_refused": refused,
            "framed_tune_knees_refused": {s[4:]: float((f(s) > thr).mean()) for s in poss},
            "tune_knees_refused_split_half": split_half,
        })  # fmt: skip
    best = max(r["hard_made_up_refused"] for r in rows)
    near = [r for r in rows if r["hard_made_up_refused"] >= best - 0.01]
    chosen = min(near, key=lambda r: (len(r["layers"]), -r["hard_made_up_refused"]))
    return {
        "rule": RULE,
        "threshold": "the largest tune-fold knee score of each candidate",
        "made_up_sizes": {s[4:]: len(feats[f"{s}|pooled"]) for s in negs},
        "framed_tune_knees": len(feats[f"{poss[0]}|pooled"]) if poss else 0,
        "tune_knees": len(feats["tune|pooled"]),
        "gate_fit_knees": len(y_fit),
        "chosen": chosen["candidate"],
        "candidates": rows,
    }


def main(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    feats, y_fit = extract(args)
    result = study(feats, y_fit, seed=args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    log.info("chosen: %s -> %s", result["chosen"], args.out)
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
