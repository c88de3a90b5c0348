"""Probe: would a site profile gain by reading the site's single-knee crops framed another way?

``python -m train.site_reframe_probe --out docs/results/site_reframe.json`` (about 2 minutes on 2 cores).
The server grades a single-knee crop whole, letterboxed into the model's square. A site whose crops are
wide bands around a magnified joint (site2: 300 x 162) is read differently from the training crops; this
probe grades the site's single-knee crops (width below 400 px) with the shipped weights, mirror averaged,
as they are and reframed (zoomed, or a centred square a multiple of the band's height), and measures each
reading as a site profile would use it: the ordinal cut-points refitted on 100 random knees and measured on
the others, 20 draws. It chooses nothing and nothing is served: which reading to use would itself have
to be chosen per site on its own sample (docs/SITES.md).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from model.decode import decode_image
from model.paths import SITE2
from model.postprocess import decode_grades
from train import site_fit
from train.probe_figures import profile_draws, raw_figures, write_result
from train.served_path import RequestPath
from train.site_sample import read_sample

log = logging.getLogger(__name__)


def window(im: np.ndarray, width: float, height: float) -> np.ndarray:
    """The centred ``width`` x ``height`` window of ``im`` (black beyond it)."""
    h, w = im.shape
    m = np.float32([[1, 0, -(w - width) / 2], [0, 1, -(h - height) / 2]])
    return cv2.warpAffine(im, m, (round(width), round(height)), flags=cv2.INTER_LINEAR)


def zoom(share: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda im: window(im, share * im.shape[1], share * im.shape[0])


def square(of_height: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda im: window(im, of_height * im.shape[0], of_height * im.shape[0])


READINGS: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    "whole": ("the crop as it is (what the server grades)", zoom(1.0)),
    "zoom_0.9": ("the central 90% of each side", zoom(0.9)),
    "zoom_0.8": ("the central 80% of each side", zoom(0.8)),
    "square_1.0": ("a centred square as high as the band", square(1.0)),
    "square_1.3": ("a centred square 1.3 x the band's height", square(1.3)),
}


CHOICE = ("whole", "square_1.0", "square_1.3")  # what a site check could choose among


def chosen_per_draw(
    logits: dict[str, np.ndarray], y: np.ndarray, path: RequestPath, args: argparse.Namespace
) -> dict[str, Any]:
    """The reading a site check would choose on each draw's knees (the best cross-fitted score of refitted
    cut-points inside the draw), measured on the other knees: what choosing per site would give."""
    rng = np.random.default_rng(args.seed)  # the same draws as the readings' rows
    base, method = path.contract.postprocess, site_fit.METHODS["cutpoints"]
    accuracy, names = [], []
    for d in range(args.draws):
        fit = np.sort(rng.choice(len(y), args.knees, replace=False))
        test = np.setdiff1d(np.arange(len(y)), fit)
        inner = {r: site_fit.cross_fit(x[fit], y[fit], base, ["cutpoints"], repeats=2, seed=d)["cutpoints"]["score"]
                 for r, x in logits.items()}  # fmt: skip
        best = max(inner, key=inner.get)
        cfg = site_fit.fit(method, base, logits[best][fit], y[fit], None)
        grades = decode_grades(site_fit.probabilities(logits[best][test], cfg), cfg)
        accuracy.append(float(np.mean(grades == y[test])))
        names.append(best)
    return {
        "among": list(logits),
        "rule": "per draw, the reading whose cut-points score best by 5-fold cross-fitting inside the draw's knees",
        "accuracy": round(float(np.mean(accuracy)), 4),
        "accuracy_sd": round(float(np.std(accuracy)), 4),
        "chosen": {r: names.count(r) for r in logits},
    }


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", default="weights/oamen.ckpt")
    p.add_argument("--site-data", default=str(SITE2), help="the site's labelled knees (<grade>/<image>)")
    p.add_argument("--max-width", type=int, default=400, help="single-knee crops: narrower than this")
    p.add_argument("--knees", type=int, default=100)
    p.add_argument("--draws", type=int, default=20)
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("--out", default="docs/results/site_reframe.json")
    return p


@torch.inference_mode()
def logits_of(path: RequestPath, images: list[np.ndarray], batch: int = 16) -> np.ndarray:
    """(N, 2, K) the grader's logits of each image and its mirror, as the server runs it."""
    out = []
    for i in tqdm(range(0, len(images), batch), desc="grade", leave=False):
        x = path.model_input(path.prepared(images[i : i + batch]))
        n = len(x)
        y = path.net(torch.cat([x, torch.flip(x, dims=[3])]).contiguous(memory_format=torch.channels_last))
        y = y.float().numpy()[:, : path.contract.num_classes]
        out.append(np.stack([y[:n], y[n:]], 1))
    return np.concatenate(out)


def main(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    site = read_sample(args.site_data)
    path = RequestPath(args.weights, None)
    images, labels = [], []
    for f, g in zip(site.files, site.grades, strict=True):
        im = decode_image(f.read_bytes(), max_pixels=path.contract.max_pixels, knee_only=True)
        if im.shape[1] < args.max_width:
            images.append(im)
            labels.append(g)
    y = np.asarray(labels)
    rows, all_logits = {}, {}
    for name, (what, reframe) in READINGS.items():
        all_logits[name] = logits_of(path, [reframe(im) for im in images])
        figs, p = raw_figures(all_logits[name], y)
        rows[name] = {"what": what, "weights_alone": figs,
                      f"profile_from_{args.knees}": profile_draws(p, y, args.knees, args.draws, args.seed)}  # fmt: skip
        log.info("%s: %s", name, json.dumps(rows[name]))
    result_choice = chosen_per_draw(
        {name: logits for name, logits in all_logits.items() if name in CHOICE}, y, path, args
    )
    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "weights": args.weights,
        "model_version": path.contract.model_version,
        "site": args.site_data,
        "knees": len(y),
        "protocol": f"single-knee crops (width < {args.max_width} px) graded whole by the shipped weights, mirror "
        f"averaged, no finder and no knee gate; cut-points refitted on {args.knees} random knees, measured on the "
        f"others, {args.draws} draws (the same draws for every reading)",
        "readings": rows,
        "chosen_per_site": result_choice,
    }
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
