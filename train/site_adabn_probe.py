"""Probe: does re-estimating the batch-norm statistics on a site's own knees (AdaBN) help its calibration?

``python -m train.site_adabn_probe --out docs/results/site_adabn.json`` (about 10 minutes on 2 cores).
Each draw takes 100 of the site's labelled knees, re-estimates every batch-norm layer's statistics on them
(and their mirrors; labels unused), refits the site profile's decoding on them, and measures on the other
knees, beside the profile fitted without AdaBN on the same draw. Not served: it changes buffers of the
weights, and docs/SITES.md says why it was not adopted.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model.checkpoint import model_from_checkpoint
from model.localize import crop_joint, find_joints, plan
from model.postprocess import decode_grades, split_outputs
from model.preprocess import prepare, to_model_input
from train import site_fit
from train.site_path import ServedSitePath, sha256
from train.site_sample import read_sample

log = logging.getLogger(__name__)
VARIANTS = {  # name: (AdaBN, site_fit method or None for the shipped decoding)
    "profile": (False, "cutpoints"),
    "adabn": (True, None),
    "adabn+profile": (True, "cutpoints"),
    "adabn+shift": (True, "cutpoints-shift"),
    "adabn+bias+profile": (True, "bias+cutpoints"),
}


def site_inputs(path: ServedSitePath, files: list[Path]) -> list[np.ndarray]:
    """Each file's model inputs as the served path cuts them (the finder's knees, else the image whole)."""
    c, (net, cfg) = path.contract, path.finder
    out = []
    for f in tqdm(files, desc="site knees", unit="knee"):
        im = path.read(Path(f))
        pl = plan(find_joints(net, cfg, [im])[0], im.shape, cfg)
        crops = [crop_joint(im, j) for j in pl.joints] if pl.kind == "film" else [im]
        out.append(np.stack([to_model_input(prepare(g, c), c) for g in crops]))
    return out


@torch.inference_mode()
def all_logits(net: torch.nn.Module, inputs: list[np.ndarray], k: int) -> np.ndarray:
    """(N, 2, K): each file's logits, image and mirror, averaged over its knees."""
    rows = []
    for x in inputs:
        t = torch.from_numpy(x)
        rows.append(np.stack([split_outputs(net(v).float().numpy(), k)[0].mean(axis=0)
                              for v in (t, torch.flip(t, dims=[3]))]))  # fmt: skip
    return np.stack(rows)


def adapted(net: torch.nn.Module, inputs: list[np.ndarray]) -> torch.nn.Module:
    """A copy of ``net`` whose batch-norm statistics are re-estimated on ``inputs`` and their mirrors."""
    m = copy.deepcopy(net)
    for b in m.modules():
        if isinstance(b, torch.nn.modules.batchnorm._BatchNorm):
            b.reset_running_stats()
            b.momentum = None  # a plain average over every batch
            b.train()
    x = torch.from_numpy(np.concatenate(inputs))
    x = torch.cat([x, torch.flip(x, dims=[3])])
    with torch.no_grad():
        for i in range(0, len(x), 32):
            m(x[i : i + 32])
    return m.eval()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--site-data", default="../shared/data/site2")
    p.add_argument("--weights", default="weights/oamen.ckpt")
    p.add_argument("--finder", default="weights/finder.pt")
    p.add_argument("--knees", type=int, default=100)
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("--out", default="docs/results/site_adabn.json")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    path = ServedSitePath(a.weights, a.finder, dtype="fp32")
    site = read_sample(a.site_data)
    inputs, labels = site_inputs(path, site.files), np.asarray(site.grades)
    net = model_from_checkpoint(a.weights)[0].eval()
    base, k = path.contract.postprocess, path.contract.num_classes
    plain = all_logits(net, inputs, k)
    rng = np.random.default_rng(a.seed)
    figs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in tqdm(range(a.draws), desc="draws"):
        fit = np.sort(rng.choice(len(labels), a.knees, replace=False))
        test = np.setdiff1d(np.arange(len(labels)), fit)
        ada = all_logits(adapted(net, [inputs[i] for i in fit]), inputs, k)
        for name, (use_ada, method) in VARIANTS.items():
            lg = ada if use_ada else plain
            cfg = base if method is None else site_fit.fit(site_fit.METHODS[method], base, lg[fit], labels[fit])
            prob = site_fit.probabilities(lg[test], cfg)
            figs[name].append(site_fit.held_out_figures(labels[test], prob, decode_grades(prob, cfg), k))
    result = {
        "what": __doc__.splitlines()[0],
        "site": str(a.site_data),
        "weights_sha256": sha256(a.weights),
        "knees_fitted": a.knees,
        "draws": a.draws,
        "variants": {
            name: {m: round(float(np.mean([f[m] for f in rows])), 4) for m in ("accuracy", "qwk", "mae")}
            | {"accuracy_sd": round(float(np.std([f["accuracy"] for f in rows])), 4)}
            for name, rows in figs.items()
        },
    }
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    log.info("wrote %s: %s", a.out, result["variants"])
    return result


if __name__ == "__main__":
    main()
