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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from model.contract import InputContract, PostprocessConfig
from model.paths import LEGFILMS
from train.calibration import (
    FIT_SETS,
    FeatureCache,
    choose_answer,
    head_logits,
    pooled_features,
    uncertain_threshold,
    view_probabilities,
)
from train.data import Sample, parse_patient, prepare_all, samples_from_files, scan
from train.knee_gate import (
    FramedFit,
    fit_framed_gate,
    gate_features,
    gate_fit_knees,
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
    p.add_argument("--films", default=str(LEGFILMS), help="leg films whose tune AP knees must pass")
    p.add_argument("--boxes", default="annotations/legfilms.csv", help="the knee boxes of --films")
    p.add_argument("--coverage", type=float, default=0.8, help="share of val answers not flagged uncertain")
    p.add_argument("--max-gate-fit", type=int, default=3000, help="training knees used to fit the gate")
    p.add_argument(
        "--gate-framings",
        type=float,
        default=1.0,
        help="framed copies (train.framings) joining the gate's knees and the tune fold, as a share of them "
        "(0: the dataset's crops alone, which refused most of a second site's knees)",
    )
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


@dataclass
class Inputs:
    """What the fits read: the run's weights, its tune fold, val and the training knees of the gate;
    features come from ``features`` (a cache keyed by the weights)."""

    ckpt: Path
    net: torch.nn.Module
    contract: InputContract
    tune: list[Sample]
    val: list[Sample]
    gate_fit: list[Sample]
    features: FeatureCache
    cache: str | None
    batch_size: int

    @classmethod
    def load(cls, args: argparse.Namespace) -> Inputs:
        run = Path(args.run)
        config = json.loads((run / "config.json").read_text())
        ckpt = Path(args.checkpoint or run / "best.pt")
        net, contract = model_from_checkpoint(ckpt)
        net = net.to(memory_format=torch.channels_last)
        if not hasattr(net, "knee_gate"):
            raise ValueError(f"{contract.model_name} has no knee gate: calibrate an OA-MEN model")
        samples = scan(args.data or config["data"], contract.num_classes)
        tune = samples_from_files(config["tune_files"], samples)
        val = [s for s in samples if s.split == "val"]
        gate_fit = gate_fit_knees(samples, tune, args.max_gate_fit, args.seed)
        cache = args.cache_dir or None
        features = FeatureCache(cache, ckpt, net.cfg.gate_layers)
        return cls(ckpt, net, contract, tune, val, gate_fit, features, cache, args.batch_size)

    def prepared(self, samples: list[Sample], name: str) -> np.ndarray:
        return prepare_all(samples, self.contract, self.cache, name)

    def gate_layers(self, name: str, images: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """The pooled features and the gate's layers of ``images``, from the cache when there."""

        def compute() -> list[np.ndarray]:
            pooled, layers = gate_features(self.net, images, self.contract, self.batch_size)
            return [pooled, *layers]

        arrays = self.features.get(name, images, compute)
        return arrays[0], arrays[1:]

    def logits(self, name: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """The head's logits of ``images``, of their mirrors, and the gate's layers of the images."""
        pooled, layers = self.gate_layers(name, images)
        mirrored = self.features.get(
            f"{name}-mirrored",
            images,
            lambda: [pooled_features(self.net, images, self.contract, True, self.batch_size)],
        )[0]
        return head_logits(self.net, pooled), head_logits(self.net, mirrored), layers


@dataclass(frozen=True)
class GateFit:
    """The knee gate fitted on training knees (and framed copies), thresholded on the tune fold and its films."""

    framed: FramedFit
    film_scores: np.ndarray
    threshold_koa: float
    threshold: float
    split_half: float


def fit_gate(inp: Inputs, tune_layers: list[np.ndarray], args: argparse.Namespace) -> GateFit:
    """The knee gate on the training knees (not the tune fold), thresholded on the tune fold and its films;
    with ``--gate-framings``, both sets joined by copies framed as other sites frame knees."""
    framed = fit_framed_gate(
        inp.net, inp.contract, inp.gate_fit, inp.tune, args.gate_framings, args.seed,
        lambda name, images: inp.gate_layers(name, images)[1], tune_layers, inp.cache,
    )  # fmt: skip
    film_knees = tune_film_knees(args.films, args.boxes, inp.contract)
    s_films = gate_scores(inp.net, inp.gate_layers("tunefilms", film_knees)[1]) if len(film_knees) else np.zeros(0)
    threshold_koa, threshold = gate_threshold(framed.tune_scores, s_films, args.gate_quantile)
    split_half = split_half_refusals(framed.tune_scores, args.gate_quantile, args.seed)
    return GateFit(framed, s_films, threshold_koa, threshold, split_half)


def calibration_report(fits: dict, post: PostprocessConfig, args: argparse.Namespace) -> dict[str, Any]:
    """calibration.json's ``calibration``: how the chosen way of reading was calibrated, and the other."""
    fit, other = fits[post.flip_tta], fits[not post.flip_tta]
    return {
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
            "chosen": other["method"],
            "fit_on": other["fit_on"],
            "fit_sets": other["fit_sets"],
        },
        "fit_sets_cv": "val split into 5 patient-grouped folds, each predicted by the calibration fitted on "
        "the other folds (and the tune fold where part of the set), 10 repeats",
    }


def main(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    inp = Inputs.load(args)
    net, contract, k = inp.net, inp.contract, inp.contract.num_classes

    # 1. calibration, for each way of reading an image (once, or averaged with its mirror, which
    #    softens the probabilities, so each is calibrated on its own): the methods compared by
    #    cross-validation inside the tune fold; where to fit the chosen one measured on val by
    #    cross-fitting (val's logits, read here for that only), then fitted on that set. Then the
    #    decoding of each, chosen on the tune fold.
    l_tune, l_tune_flip, g_tune = inp.logits("tune", inp.prepared(inp.tune, "tune"))
    l_val, l_val_flip, _ = inp.logits("val", inp.prepared(inp.val, "val"))
    y_tune = np.array([s.grade for s in inp.tune])
    groups = np.array([parse_patient(s.path) or str(s.path) for s in inp.tune])
    y_val = np.array([s.grade for s in inp.val])
    g_val = np.array([parse_patient(s.path) or str(s.path) for s in inp.val])
    views = {  # (N, K) logits, or (N, 2, K) for the image and its mirror (view_probabilities)
        False: (l_tune, l_val),
        True: (np.stack([l_tune, l_tune_flip], 1), np.stack([l_val, l_val_flip], 1)),
    }
    fits, candidates, chosen = choose_answer(
        views, y_tune, groups, (y_val, g_val), k, fit_on=args.fit_on, flip=args.flip, seed=args.seed
    )
    post: PostprocessConfig = chosen["config"]

    # 2. the knee gate
    gate = fit_gate(inp, g_tune, args)

    # 3. the uncertain flag, chosen on val for the stated coverage
    uncertain_below = uncertain_threshold(view_probabilities(views[post.flip_tta][1], post), post, args.coverage)

    post = PostprocessConfig(
        temperature=round(post.temperature, 4),
        class_bias=tuple(round(b, 4) for b in post.class_bias),
        decision=post.decision,
        cutpoints=post.cutpoints,
        flip_tta=post.flip_tta,
        uncertain_below=round(uncertain_below, 4),
        gate="mahalanobis",
        gate_threshold=round(gate.threshold, 3),
    )
    calibrated = contract.replace(postprocess=post.__dict__, model_version=args.version or contract.model_version)
    state = load_checkpoint(inp.ckpt)
    extra = {k2: v for k2, v in state.items() if k2 in ("epoch", "metrics", "config")}
    out = save_checkpoint(args.out, net.to(memory_format=torch.contiguous_format), calibrated, **extra)
    s_films = gate.film_scores
    report = {
        "checkpoint": str(inp.ckpt),
        "out": str(out),
        "postprocess": calibrated.postprocess.__dict__,
        "tune_fold": {"images": len(inp.tune), "patients": len({parse_patient(s.path) for s in inp.tune})},
        "gate_fit_images": len(inp.gate_fit),
        "gate_framings": {
            "share": args.gate_framings,
            "gate_fit_copies": gate.framed.fit_copies,
            "tune_copies": gate.framed.tune_copies,
        },
        "gate_quantile": args.gate_quantile,
        "gate_threshold_dataset_knees": gate.threshold_koa,
        "gate_film_knees": {
            "films": args.films,
            "knees": len(s_films),
            "max_score": float(s_films.max()) if len(s_films) else None,
            "refused_at_dataset_threshold": float((s_films > gate.threshold_koa).mean()) if len(s_films) else None,
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
        "calibration": calibration_report(fits, post, args),
        "gate": {
            "layers": list(net.cfg.gate_layers),
            "layer_dims": list(net.knee_gate.layer_dims),
            "combination": "largest of the layer scores, each standardised by its tune-fold mean and sd",
            "loc": net.knee_gate.loc.tolist(),
            "scale": net.knee_gate.scale.tolist(),
            "tune_knees_refused_split_half": gate.split_half,
        },
        "tune_gate_scores": {"p50": float(np.median(gate.framed.tune_scores)), "threshold": gate.threshold},
    }
    report_path = Path(args.out).with_name("calibration.json")
    report_path.write_text(json.dumps(report, indent=2, default=list))
    log.info("calibrated %s -> %s: %s", inp.ckpt, out, json.dumps(report["postprocess"]))
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
