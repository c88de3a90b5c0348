"""Fit what turns a trained OA-MEN's logits into an answer a reader can trust; write it into the weights.

``python -m train.calibrate --run runs/oamen_pt --out weights/oamen.ckpt``

Everything is fitted on data the weights never trained on, and nothing on the validation split
except the one threshold the issue asks to choose there (the uncertain flag's coverage):

- **temperature** (`model.postprocess`): the one scalar that minimises the negative
  log-likelihood of the tune fold (the patient-grouped share of train that `train.fit` held out);
- **decision**: the argmax, or cut-points on the expected grade fitted on the tune fold to
  maximise the mean of top-1 accuracy and quadratic kappa; the better on the tune fold is kept;
- **flip averaging** (the image and its mirror): measured on the tune fold both ways; with
  ``--flip auto`` kept when it gains more than 0.005 of the score there. The default is ``off``:
  it runs the model twice per image, which halves the served throughput, and the project's
  served-speed target (docs/BENCHMARKS.md) has no room for that on a CPU;
- **knee gate** (`model.gate`): class means and a shared, shrunk covariance of the pooled
  features of the training knees; the refusal threshold is the ``--gate-quantile`` of the tune
  fold's knee scores, so that about 1 - q of real knees would be refused. The non-knee
  radiographs are never fitted on: they only measure the gate (`train.evaluate`);
- **uncertain flag**: the confidence below which the least confident ``1 - coverage`` of the
  validation answers fall.

Writes the checkpoint with the fitted gate and the contract's ``postprocess`` section, and
``calibration.json`` beside it (what was fitted, on what, with the tune-fold figures).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from tqdm import tqdm

from model.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from model.contract import InputContract, PostprocessConfig
from model.postprocess import calibrated_probabilities, decode_grades, expected_grade
from model.preprocess import to_model_input
from train.data import Sample, parse_patient, prepare_all, scan
from train.metrics import quadratic_weighted_kappa

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
    p.add_argument("--coverage", type=float, default=0.8, help="share of val answers not flagged uncertain")
    p.add_argument("--max-gate-fit", type=int, default=3000, help="training knees used to fit the gate")
    p.add_argument(
        "--flip",
        choices=("off", "on", "auto"),
        default="off",
        help="mirror averaging: off (one forward pass per image), on, or auto (when it gains on the tune fold)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cache-dir", default="cache")
    p.add_argument("--seed", type=int, default=0)
    return p


@torch.inference_mode()
def pooled_features(
    net: torch.nn.Module, images: np.ndarray, contract: InputContract, flip: bool = False, batch_size: int = 32
) -> np.ndarray:
    """(N, S, S) prepared uint8 images -> (N, D) pooled features (of the mirrored images if ``flip``)."""
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="features" + (" (mirrored)" if flip else ""), leave=False):
        chunk = images[i : i + batch_size]
        if flip:
            chunk = chunk[:, :, ::-1]
        x = torch.from_numpy(np.stack([to_model_input(np.ascontiguousarray(im), contract) for im in chunk]))
        out.append(net.forward_features(x.contiguous(memory_format=torch.channels_last)).float().numpy())
    return np.concatenate(out)


@torch.inference_mode()
def head_logits(net: torch.nn.Module, features: np.ndarray) -> np.ndarray:
    return net.forward_head(torch.from_numpy(features)).float().numpy()


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the mean negative log-likelihood (grid on log T, then refined)."""

    def nll(t: float) -> float:
        p = calibrated_probabilities(logits, PostprocessConfig(temperature=t))
        return float(-np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, None)).mean())

    grid = np.exp(np.linspace(np.log(0.25), np.log(8.0), 121))
    best = min(grid, key=nll)
    fine = best * np.exp(np.linspace(-0.03, 0.03, 31))
    return float(min(fine, key=nll))


def decision_score(labels: np.ndarray, grades: np.ndarray, k: int) -> float:
    """What the decision rule is chosen by: the mean of top-1 accuracy and quadratic kappa."""
    return 0.5 * (float((grades == labels).mean()) + quadratic_weighted_kappa(labels, grades, k))


def fit_cutpoints(probs: np.ndarray, labels: np.ndarray, rounds: int = 3) -> tuple[float, ...]:
    """K-1 increasing cut-points on the expected grade maximising `decision_score` (coordinate search)."""
    k = probs.shape[1]
    e = expected_grade(probs)
    cuts = np.arange(k - 1, dtype=np.float64) + 0.5

    def score(c: np.ndarray) -> float:
        return decision_score(labels, np.searchsorted(c, e, side="right"), k)

    for _ in range(rounds):
        for j in range(k - 1):
            lo = cuts[j - 1] + 1e-3 if j > 0 else 0.0
            hi = cuts[j + 1] - 1e-3 if j < k - 2 else float(k - 1)
            candidates = np.linspace(lo, hi, 81)
            best, best_s = cuts[j], score(cuts)
            for c in candidates:
                trial = cuts.copy()
                trial[j] = c
                s = score(trial)
                if s > best_s + 1e-9:
                    best, best_s = c, s
            cuts[j] = best
    return tuple(round(float(c), 4) for c in cuts)


def fit_gate(features: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Class means (K, D) and the shared precision (D, D) of class-centred features (Ledoit-Wolf shrinkage)."""
    means = np.stack([features[labels == c].mean(0) for c in range(k)])
    centred = features - means[labels]
    cov = LedoitWolf(assume_centered=True).fit(centred)
    return means.astype(np.float32), cov.precision_.astype(np.float32)


@torch.inference_mode()
def gate_scores(net: torch.nn.Module, features: np.ndarray) -> np.ndarray:
    return net.knee_gate(torch.from_numpy(features)).numpy()


def samples_from_files(files: list[str], root_samples: list[Sample]) -> list[Sample]:
    by_path = {str(s.path): s for s in root_samples}
    missing = [f for f in files if f not in by_path]
    if missing:
        raise FileNotFoundError(f"{len(missing)} tune files are not in the dataset, e.g. {missing[0]}")
    return [by_path[f] for f in files]


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
    f_tune = pooled_features(net, x_tune, contract, batch_size=args.batch_size)
    f_tune_flip = pooled_features(net, x_tune, contract, flip=True, batch_size=args.batch_size)

    # 1. temperature, without and with flip averaging (averaging softens: fit T for each)
    l_tune = head_logits(net, f_tune)
    l_tune_flip = head_logits(net, f_tune_flip)
    t_plain = fit_temperature(l_tune, y_tune)
    t_flip = fit_temperature(0.5 * (l_tune + l_tune_flip), y_tune)

    def probs_of(logits: np.ndarray, logits_flip: np.ndarray | None, t: float) -> np.ndarray:
        cfg = PostprocessConfig(temperature=t)
        p = calibrated_probabilities(logits, cfg)
        if logits_flip is not None:
            p = 0.5 * (p + calibrated_probabilities(logits_flip, cfg))
        return p

    candidates: dict[str, dict[str, Any]] = {}
    for flip in (False, True):
        p = probs_of(l_tune, l_tune_flip if flip else None, t_flip if flip else t_plain)
        cuts = fit_cutpoints(p, y_tune)
        for decision in ("argmax", "cutpoints"):
            cfg = PostprocessConfig(
                temperature=t_flip if flip else t_plain,
                decision=decision,
                cutpoints=cuts if decision == "cutpoints" else (),
                flip_tta=flip,
            )
            g = decode_grades(p, cfg)
            candidates[f"{decision}{'+flip' if flip else ''}"] = {
                "config": cfg,
                "tune_score": decision_score(y_tune, g, k),
                "tune_accuracy": float((g == y_tune).mean()),
                "tune_qwk": quadratic_weighted_kappa(y_tune, g, k),
                "tune_kl1_recall": float((g[y_tune == 1] == 1).mean()) if (y_tune == 1).any() else None,
            }
    # Flip averaging doubles the model's cost: keep it only for a real gain on the tune fold.
    best_plain = max((c for n, c in candidates.items() if "flip" not in n), key=lambda c: c["tune_score"])
    best_flip = max((c for n, c in candidates.items() if "flip" in n), key=lambda c: c["tune_score"])
    if args.flip == "auto":
        chosen = best_flip if best_flip["tune_score"] > best_plain["tune_score"] + 0.005 else best_plain
    else:
        chosen = best_flip if args.flip == "on" else best_plain
    post: PostprocessConfig = chosen["config"]

    # 2. the knee gate, fitted on training knees (not the tune fold), thresholded on the tune fold
    x_fit = prepare_all(gate_fit, contract, cache, "gatefit")
    f_fit = pooled_features(net, x_fit, contract, batch_size=args.batch_size)
    means, precision = fit_gate(f_fit, np.array([s.grade for s in gate_fit]), k)
    net.knee_gate.set_statistics(torch.from_numpy(means), torch.from_numpy(precision))
    s_tune = gate_scores(net, f_tune)
    threshold = float(np.quantile(s_tune, args.gate_quantile))

    # 3. the uncertain flag, chosen on val for the stated coverage
    f_val = pooled_features(net, x_val, contract, batch_size=args.batch_size)
    l_val = head_logits(net, f_val)
    l_val_flip = None
    if post.flip_tta:
        l_val_flip = head_logits(net, pooled_features(net, x_val, contract, True, args.batch_size))
    p_val = probs_of(l_val, l_val_flip, post.temperature)
    g_val = decode_grades(p_val, post)
    conf_val = p_val[np.arange(len(g_val)), g_val]
    uncertain_below = float(np.quantile(conf_val, 1.0 - args.coverage))

    post = PostprocessConfig(
        temperature=round(post.temperature, 4),
        decision=post.decision,
        cutpoints=post.cutpoints,
        flip_tta=post.flip_tta,
        uncertain_below=round(uncertain_below, 4),
        gate="mahalanobis",
        gate_threshold=round(threshold, 3),
    )
    calibrated = contract.replace(postprocess=post.__dict__)
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
        "flip": args.flip,
        "coverage": args.coverage,
        "temperature_plain": t_plain,
        "temperature_flip": t_flip,
        "candidates": {
            n: {kk: vv for kk, vv in c.items() if kk != "config"} | {"cutpoints": list(c["config"].cutpoints)}
            for n, c in candidates.items()
        },
        "chosen": next(n for n, c in candidates.items() if c is chosen),
        "tune_gate_scores": {"p50": float(np.median(s_tune)), "threshold": threshold},
    }
    report_path = Path(args.out).with_name("calibration.json")
    report_path.write_text(json.dumps(report, indent=2, default=list))
    log.info("calibrated %s -> %s: %s", ckpt, out, json.dumps(report["postprocess"]))
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
