"""Fit what turns a trained OA-MEN's logits into an answer a reader can trust; write it into the weights.

``python -m train.calibrate --run runs/oamen_pt --out weights/oamen.ckpt``

Runs the fits of `train.calibration` and `train.knee_gate` on data the weights never trained on
(calibration, decision rule, mirror averaging, knee gate, uncertain flag) and writes the checkpoint
and ``calibration.json`` beside it. docs/TRAINING.md (`train.calibrate`) says how each is chosen.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from model.contract import PostprocessConfig
from train.calibration import (
    FIT_SETS,
    FeatureCache,
    choose_answer,
    head_logits,
    pooled_features,
    uncertain_threshold,
    view_probabilities,
)
from train.data import parse_patient, prepare_all, samples_from_files, scan
from train.knee_gate import (
    fit_knee_gate,
    gate_features,
    gate_scores,
    gate_threshold,
    split_half_refusals,
    tune_film_knees,
)

log = logging.getLogger("train.calibrate")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a train.fit output folder (config.json lists its tune fold)")
    p.add_argument("--checkpoint", default=None, help="default: RUN/best.pt")
    p.add_argument("--data", default=None, help="dataset root (default: the run's)")
    p.add_argument("--out", required=True, help="where to write the calibrated checkpoint")
    p.add_argument(
        "--gate-quantile",
        type=float,
        default=1.0,
        help="share of tune-fold knees the gate lets through (1: all; the fold is too small to place a 0.99x quantile)",
    )
    p.add_argument("--films", default="../shared/data/legfilms", help="leg films whose tune AP knees must pass")
    p.add_argument("--boxes", default="annotations/legfilms.csv", help="the knee boxes of --films")
    p.add_argument("--coverage", type=float, default=0.8, help="share of val answers not flagged uncertain")
    p.add_argument("--max-gate-fit", type=int, default=3000, help="training knees used to fit the gate")
    p.add_argument(
        "--flip",
        choices=("off", "on", "auto"),
        default="auto",
        help="mirror averaging: off (one forward pass per image), on, or auto (when it gains on the tune fold)",
    )
    p.add_argument(
        "--fit-on",
        choices=("auto", *FIT_SETS),
        default="auto",
        help="what the calibration is fitted on; auto: the lowest cross-fitted val ECE (see the module doc)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cache-dir", default="cache")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--version",
        default=None,
        help="model_version of the calibrated weights (default: the checkpoint's); the calibration and the "
        "decoding are part of the answer, so a new one on the same weights is a new version",
    )
    return p


def main(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run = Path(args.run)
    config = json.loads((run / "config.json").read_text())
    ckpt = Path(args.checkpoint or run / "best.pt")
    net, contract = model_from_checkpoint(ckpt)
    net = net.to(memory_format=torch.channels_last)
    if not hasattr(net, "knee_gate"):
        raise ValueError(f"{contract.model_name} has no knee gate: calibrate an OA-MEN model")
    k = contract.num_classes
    samples = scan(args.data or config["data"], k)
    tune = samples_from_files(config["tune_files"], samples)
    tune_set = {str(s.path) for s in tune}
    fit_pool = [s for s in samples if s.split == "train" and str(s.path) not in tune_set]
    val = [s for s in samples if s.split == "val"]
    rng = np.random.default_rng(args.seed)
    gate_fit = [fit_pool[i] for i in sorted(rng.choice(len(fit_pool), min(args.max_gate_fit, len(fit_pool)), False))]
    cache = args.cache_dir or None

    y_tune = np.array([s.grade for s in tune])
    x_tune = prepare_all(tune, contract, cache, "tune")
    x_val = prepare_all(val, contract, cache, "val")
    features = FeatureCache(cache, ckpt, net.cfg.gate_layers)

    def cached(name: str, images: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """The pooled features and the gate's layers of ``images``, from the cache when there."""

        def compute() -> list[np.ndarray]:
            pooled, layers = gate_features(net, images, contract, args.batch_size)
            return [pooled, *layers]

        arrays = features.get(name, images, compute)
        return arrays[0], arrays[1:]

    f_tune, g_tune = cached("tune", x_tune)
    f_tune_flip = features.get(
        "tune-mirrored", x_tune, lambda: [pooled_features(net, x_tune, contract, True, args.batch_size)]
    )[0]

    # 1. calibration, for each way of reading an image (once, or averaged with its mirror, which
    #    softens the probabilities, so each is calibrated on its own): the methods compared by
    #    cross-validation inside the tune fold; where to fit the chosen one measured on val by
    #    cross-fitting (val's logits, read here for that only), then fitted on that set. Then the
    #    decoding of each, chosen on the tune fold.
    l_tune = head_logits(net, f_tune)
    l_tune_flip = head_logits(net, f_tune_flip)
    groups = np.array([parse_patient(s.path) or str(s.path) for s in tune])
    f_val, _ = cached("val", x_val)
    f_val_flip = features.get(
        "val-mirrored", x_val, lambda: [pooled_features(net, x_val, contract, True, args.batch_size)]
    )[0]
    l_val = head_logits(net, f_val)
    y_val = np.array([s.grade for s in val])
    g_val = np.array([parse_patient(s.path) or str(s.path) for s in val])
    views = {  # (N, K) logits, or (N, 2, K) for the image and its mirror (view_probabilities)
        False: (l_tune, l_val),
        True: (np.stack([l_tune, l_tune_flip], 1), np.stack([l_val, head_logits(net, f_val_flip)], 1)),
    }
    fits, candidates, chosen = choose_answer(
        views, y_tune, groups, (y_val, g_val), k, fit_on=args.fit_on, flip=args.flip, seed=args.seed
    )
    post: PostprocessConfig = chosen["config"]

    # 2. the knee gate, fitted on training knees (not the tune fold), standardised and thresholded
    #    on the tune fold
    x_fit = prepare_all(gate_fit, contract, cache, "gatefit")
    _, g_fit = cached("gatefit", x_fit)
    s_tune = fit_knee_gate(net, g_fit, np.array([s.grade for s in gate_fit]), g_tune, k)
    film_knees = tune_film_knees(args.films, args.boxes, contract)
    s_films = gate_scores(net, cached("tunefilms", film_knees)[1]) if len(film_knees) else np.zeros(0)
    threshold_koa, threshold = gate_threshold(s_tune, s_films, args.gate_quantile)
    split_half = split_half_refusals(s_tune, args.gate_quantile, args.seed)

    # 3. the uncertain flag, chosen on val for the stated coverage
    fit = fits[post.flip_tta]
    uncertain_below = uncertain_threshold(view_probabilities(views[post.flip_tta][1], post), post, args.coverage)

    post = PostprocessConfig(
        temperature=round(post.temperature, 4),
        class_bias=tuple(round(b, 4) for b in post.class_bias),
        decision=post.decision,
        cutpoints=post.cutpoints,
        flip_tta=post.flip_tta,
        uncertain_below=round(uncertain_below, 4),
        gate="mahalanobis",
        gate_threshold=round(threshold, 3),
    )
    calibrated = contract.replace(postprocess=post.__dict__, model_version=args.version or contract.model_version)
    state = load_checkpoint(ckpt)
    extra = {k2: v for k2, v in state.items() if k2 in ("epoch", "metrics", "config")}
    out = save_checkpoint(args.out, net.to(memory_format=torch.contiguous_format), calibrated, **extra)
    report = {
        "checkpoint": str(ckpt),
        "out": str(out),
        "postprocess": calibrated.postprocess.__dict__,
        "tune_fold": {"images": len(tune), "patients": len({parse_patient(s.path) for s in tune})},
        "gate_fit_images": len(gate_fit),
        "gate_quantile": args.gate_quantile,
        "gate_threshold_dataset_knees": threshold_koa,
        "gate_film_knees": {
            "films": args.films,
            "knees": len(s_films),
            "max_score": float(s_films.max()) if len(s_films) else None,
            "refused_at_dataset_threshold": float((s_films > threshold_koa).mean()) if len(s_films) else None,
        },
        "flip": args.flip,
        "coverage": args.coverage,
        "temperature_plain": fits[False]["config"].temperature,
        "temperature_flip": fits[True]["config"].temperature,
        "candidates": {
            n: {kk: vv for kk, vv in c.items() if kk != "config"} | {"cutpoints": list(c["config"].cutpoints)}
            for n, c in candidates.items()
        },
        "chosen": next(n for n, c in candidates.items() if c is chosen),
        "calibration": {
            "views": "the image and its mirror, averaged" if post.flip_tta else "the image",
            "chosen": fit["method"],
            "rule": "lowest cross-validated ECE among the methods whose cross-validated NLL is no worse "
            "than temperature scaling's",
            "cv": "patient-grouped 5-fold inside the tune fold, 10 repeats",
            "methods": fit["cv"],
            "fit_on": fit["fit_on"],
            "fit_on_rule": "lowest mean cross-fitted val ECE" if args.fit_on == "auto" else "given (--fit-on)",
            "fit_sets": fit["fit_sets"],
            "other_views": {  # the same, for the way of reading the image that was not chosen
                "views": "the image" if post.flip_tta else "the image and its mirror, averaged",
                "chosen": fits[not post.flip_tta]["method"],
                "fit_on": fits[not post.flip_tta]["fit_on"],
                "fit_sets": fits[not post.flip_tta]["fit_sets"],
            },
            "fit_sets_cv": "val split into 5 patient-grouped folds, each predicted by the calibration fitted on "
            "the other folds (and the tune fold where part of the set), 10 repeats",
        },
        "gate": {
            "layers": list(net.cfg.gate_layers),
            "layer_dims": list(net.knee_gate.layer_dims),
            "combination": "largest of the layer scores, each standardised by its tune-fold mean and sd",
            "loc": net.knee_gate.loc.tolist(),
            "scale": net.knee_gate.scale.tolist(),
            "tune_knees_refused_split_half": split_half,
        },
        "tune_gate_scores": {"p50": float(np.median(s_tune)), "threshold": threshold},
    }
    report_path = Path(args.out).with_name("calibration.json")
    report_path.write_text(json.dumps(report, indent=2, default=list))
    log.info("calibrated %s -> %s: %s", ckpt, out, json.dumps(report["postprocess"]))
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
