"""Fit what turns a trained OA-MEN's logits into an answer a reader can trust; write it into the weights.

``python -m train.calibrate --run runs/oamen_pt --out weights/oamen.ckpt``

Everything is fitted on data the weights never trained on. The validation split is read for two
things only: where the calibration is fitted (below), and the uncertain flag's threshold:

- **calibration** (`model.postprocess`): none, temperature scaling, or temperature with a bias per
  class, compared by patient-grouped 5-fold cross-validation inside the tune fold (the
  patient-grouped share of train that `train.fit` held out) and chosen by a stated rule
  (`choose_calibration`). Then *what it is fitted on* (``--fit-on``): the tune fold, the val split,
  or both (none of them trained on). With ``auto`` each is measured on val by patient-grouped
  cross-fitting (`cross_fitted_val_ece`: fitted on the other val folds, plus the tune fold where it
  is part of the set, measured on the held-out val fold), and the lowest mean ECE wins: the model
  is less confident on the dataset's own val knees than on the tune fold drawn from train, and the
  held-back test split was split off as val was. The chosen set is then fitted whole by negative
  log-likelihood, so the in-sample val ECE of `train.evaluate` is optimistic when val is part of it:
  the cross-fitted figure is the one to quote;
- **decision**: the argmax, or cut-points on the expected grade fitted on the tune fold to
  maximise the mean of top-1 accuracy and quadratic kappa; the better on the tune fold is kept;
- **flip averaging** (the image and its mirror, left and right knees mirroring each other): every
  step above is done for both ways of reading an image (the mirrored one calibrated as it is served:
  each view calibrated, then averaged, `view_probabilities`), and the decoding of each measured on
  the tune fold. With ``--flip auto`` (the default) mirror averaging is kept when it gains more than
  0.005 of the score there. It runs the grader twice per image: what that costs the served
  throughput is measured by `train.bench_gate` and ``make bench`` (docs/BENCHMARKS.md);
- **knee gate** (`model.gate`): for each of the model's gate layers, class means and a shared,
  shrunk covariance of the pooled features of training knees; each layer's distance standardised on
  the tune fold's knees; the refusal threshold is the ``--gate-quantile`` of the tune fold's knee
  scores, so that about 1 - q of real knees would be refused, raised when needed to let through
  every AP knee of the ``tune`` leg films (``--films``, ``annotations/legfilms.csv``, cut out by
  `model.localize.crop_joint`): knees of another hospital and population, which a gate fitted on
  one dataset's knees alone refuses (most of them, with the four-layer gate). Which layers, and how they are
  combined, was chosen by `train.gate_study` on the tune fold and made-up negatives. The non-knee
  radiographs are never fitted on: they only measure the gate (`train.evaluate`). Features are
  cached on disk (``--cache-dir``), keyed by the weights and the images;
- **uncertain flag**: the confidence below which the least confident ``1 - coverage`` of the
  validation answers fall.

Writes the checkpoint with the fitted gate and the contract's ``postprocess`` section, and
``calibration.json`` beside it (what was fitted, on what, with the tune-fold figures).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from model.contract import InputContract, PostprocessConfig
from model.paths import LEGFILMS
from model.postprocess import calibrated_probabilities, decode_grades, expected_grade
from model.preprocess import to_model_input
from train.data import Sample, parse_patient, prepare_all, scan
from train.knee_gate import fit_knee_gate, gate_features, gate_scores, tune_film_knees
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
    p.add_argument("--films", default=str(LEGFILMS), help="leg films whose tune AP knees must pass")
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


class FeatureCache:
    """Features of prepared images on disk, keyed by the weights, the images and what is computed.

    Calibration reads the same few thousand knees through the same weights each time it runs;
    on a CPU that is most of its time.
    """

    def __init__(self, folder: str | None, checkpoint: Path, gate_layers: tuple[str, ...]) -> None:
        self.folder = Path(folder) if folder else None
        self.base = hashlib.sha1(checkpoint.read_bytes() + repr(gate_layers).encode()).hexdigest()

    def get(self, name: str, images: np.ndarray, compute) -> list[np.ndarray]:
        if self.folder is None:
            return compute()
        key = hashlib.sha1((self.base + name).encode() + images.tobytes()).hexdigest()[:16]
        path = self.folder / f"features-{name}-{key}.npz"
        if path.is_file():
            with np.load(path) as z:
                return [z[f"a{i}"] for i in range(len(z.files))]
        arrays = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **{f"a{i}": a for i, a in enumerate(arrays)})
        tmp.replace(path)
        return arrays


@torch.inference_mode()
def head_logits(net: torch.nn.Module, features: np.ndarray) -> np.ndarray:
    return net.forward_head(torch.from_numpy(features)).float().numpy()


def view_probabilities(logits: np.ndarray, cfg: PostprocessConfig) -> np.ndarray:
    """(N, K) logits, or (N, V, K) logits of V views of each knee (the image and its mirror) ->
    (N, K) probabilities: each view calibrated, then the views averaged, as `model.postprocess.finish`
    averages a mirrored image's. Every fit below takes either shape, so mirror averaging is
    calibrated as it is served."""
    x = np.asarray(logits)
    if x.ndim == 2:
        return calibrated_probabilities(x, cfg)
    return np.mean([calibrated_probabilities(x[:, v], cfg) for v in range(x.shape[1])], axis=0)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the mean negative log-likelihood (grid on log T, then refined);
    ``logits`` (N, K) or (N, V, K) (`view_probabilities`)."""

    def nll(t: float) -> float:
        return _nll(view_probabilities(logits, PostprocessConfig(temperature=t)), labels)

    grid = np.exp(np.linspace(np.log(0.25), np.log(8.0), 121))
    best = min(grid, key=nll)
    fine = best * np.exp(np.linspace(-0.03, 0.03, 31))
    return float(min(fine, key=nll))


def _nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())


def fit_temperature_and_bias(logits: np.ndarray, labels: np.ndarray) -> tuple[float, tuple[float, ...]]:
    """Temperature and K per-class biases minimising the mean negative log-likelihood (L-BFGS).

    ``softmax(logits / T + b)``: temperature scaling with a bias per class (vector scaling with one
    shared scale, Guo et al. 2017). It can also correct a shift of the grade frequencies between the
    data the model trained on and the data it sees. The biases are returned centred (the softmax
    ignores a common offset).
    """
    from scipy.optimize import minimize

    x = np.asarray(logits, dtype=np.float64)
    k = x.shape[-1]

    def loss(a: np.ndarray) -> float:
        cfg = PostprocessConfig(temperature=float(np.exp(a[0])), class_bias=tuple(float(b) for b in a[1:]))
        return _nll(view_probabilities(x, cfg), labels)

    a0 = np.r_[np.log(fit_temperature(x, labels)), np.zeros(k)]
    a = minimize(loss, a0, method="L-BFGS-B").x
    bias = a[1:] - a[1:].mean()
    return float(np.exp(a[0])), tuple(float(b) for b in bias)


CALIBRATIONS = ("none", "temperature", "temperature+bias")


def fit_calibration(logits: np.ndarray, labels: np.ndarray, method: str) -> PostprocessConfig:
    """The `PostprocessConfig` (temperature, class_bias) of one of `CALIBRATIONS`, fitted by NLL."""
    if method == "none":
        return PostprocessConfig()
    if method == "temperature":
        return PostprocessConfig(temperature=fit_temperature(logits, labels))
    if method == "temperature+bias":
        t, b = fit_temperature_and_bias(logits, labels)
        return PostprocessConfig(temperature=t, class_bias=b)
    raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {method!r}")


def cross_validate_calibration(
    logits: np.ndarray, labels: np.ndarray, groups: np.ndarray, folds: int = 5, repeats: int = 10, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Each of `CALIBRATIONS` fitted on k-1 folds of the tune fold and measured on the k-th.

    Folds are patient-grouped (both knees of a patient fall in one fold); the split is repeated
    ``repeats`` times because the 15-bin ECE of a few hundred knees is noisy. Returns, per method,
    the mean and standard deviation over repeats of the out-of-fold ECE, and the mean NLL and top-1.
    """
    from train.metrics import expected_calibration_error

    out: dict[str, dict[str, list[float]]] = {m: {"ece": [], "nll": [], "accuracy": []} for m in CALIBRATIONS}
    for r in range(repeats):
        fid = patient_folds(groups, folds, seed + r)
        for m in CALIBRATIONS:
            p = np.zeros((len(logits), logits.shape[-1]))
            for f in range(folds):
                fit, held = fid != f, fid == f
                p[held] = view_probabilities(logits[held], fit_calibration(logits[fit], labels[fit], m))
            out[m]["ece"].append(expected_calibration_error(labels, p))
            out[m]["nll"].append(_nll(p, labels))
            out[m]["accuracy"].append(float((p.argmax(1) == labels).mean()))
    return {
        m: {
            "cv_ece": float(np.mean(v["ece"])),
            "cv_ece_sd": float(np.std(v["ece"])),
            "cv_nll": float(np.mean(v["nll"])),
            "cv_accuracy": float(np.mean(v["accuracy"])),
        }
        for m, v in out.items()
    }


def choose_calibration(cv: dict[str, dict[str, float]]) -> str:
    """The rule, stated before measuring: lowest cross-validated ECE, among the methods whose
    cross-validated NLL (a proper score, so it cannot be gamed by binning) is no worse than
    temperature scaling's."""
    ref = cv["temperature"]["cv_nll"]
    ok = [m for m in cv if m == "temperature" or cv[m]["cv_nll"] <= ref]
    return min(ok, key=lambda m: cv[m]["cv_ece"])


FIT_SETS = ("tune", "tune+val", "val")


def patient_folds(groups: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """(N,) the fold of each knee: patients dealt round-robin into ``folds`` in a seeded random order,
    so both knees of a patient fall in one fold."""
    order = np.random.default_rng(seed).permutation(np.unique(groups))
    fold_of = {g: i % folds for i, g in enumerate(order)}
    return np.array([fold_of[g] for g in groups])


def fit_set_data(
    fit_on: str, tune: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """The (logits, labels) a calibration is fitted on for ``fit_on`` (one of `FIT_SETS`)."""
    parts = [part for name, part in (("tune", tune), ("val", val)) if name in fit_on.split("+")]
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


def cross_fitted_val_ece(
    tune: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray, np.ndarray],
    method: str,
    fit_on: str,
    folds: int = 5,
    repeats: int = 10,
    seed: int = 0,
) -> dict[str, float]:
    """The val ECE of ``method`` fitted on ``fit_on`` (one of `FIT_SETS`), each val knee's
    probabilities coming from a fit that did not see it.

    ``tune`` is (logits, labels), ``val`` (logits, labels, patient groups). Val is split into
    patient-grouped folds; each fold is predicted by the calibration fitted on the other folds (and
    the tune fold when ``fit_on`` includes it). ``"tune"`` needs no folds. Repeated ``repeats``
    times over random fold assignments: returns the mean, sd, min and max ECE and the mean NLL.
    """
    from train.metrics import expected_calibration_error

    if fit_on not in FIT_SETS:
        raise ValueError(f"fit_on must be one of {FIT_SETS}, got {fit_on!r}")
    (lt, yt), (lv, yv, gv) = tune, val
    eces, nlls = [], []
    for r in range(1 if fit_on == "tune" else repeats):
        p = np.zeros((len(lv), lv.shape[-1]))
        if fit_on == "tune":
            p[:] = view_probabilities(lv, fit_calibration(lt, yt, method))
        else:
            fid = patient_folds(gv, folds, seed + r)
            for f in range(folds):
                fit, held = fid != f, fid == f
                x, y = fit_set_data(fit_on, (lt, yt), (lv[fit], yv[fit]))
                p[held] = view_probabilities(lv[held], fit_calibration(x, y, method))
        eces.append(expected_calibration_error(yv, p))
        nlls.append(_nll(p, yv))
    return {
        "ece": float(np.mean(eces)),
        "ece_sd": float(np.std(eces)),
        "ece_min": float(np.min(eces)),
        "ece_max": float(np.max(eces)),
        "nll": float(np.mean(nlls)),
        "repeats": len(eces),
    }


def choose_fit_set(measured: dict[str, dict[str, float]]) -> str:
    """The fit set with the lowest mean cross-fitted val ECE (ties: the one that reads val least)."""
    return min(FIT_SETS, key=lambda s: (round(measured[s]["ece"], 6), FIT_SETS.index(s)))


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
    fits: dict[bool, dict[str, Any]] = {}
    candidates: dict[str, dict[str, Any]] = {}
    for flip, (lt, lv) in views.items():
        calibration_cv = cross_validate_calibration(lt, y_tune, groups, seed=args.seed)
        calibration = choose_calibration(calibration_cv)
        fit_sets = {
            s: cross_fitted_val_ece((lt, y_tune), (lv, y_val, g_val), calibration, s, seed=args.seed) for s in FIT_SETS
        }
        fit_on = choose_fit_set(fit_sets) if args.fit_on == "auto" else args.fit_on
        fitted = fit_calibration(*fit_set_data(fit_on, (lt, y_tune), (lv, y_val)), calibration)
        fits[flip] = {"cv": calibration_cv, "method": calibration, "fit_sets": fit_sets, "fit_on": fit_on,
                      "config": fitted}  # fmt: skip
        p = view_probabilities(lt, fitted)
        cuts = fit_cutpoints(p, y_tune)
        for decision in ("argmax", "cutpoints"):
            cfg = replace(fitted, decision=decision, cutpoints=cuts if decision == "cutpoints" else (), flip_tta=flip)
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

    # 2. the knee gate, fitted on training knees (not the tune fold), standardised and thresholded
    #    on the tune fold
    x_fit = prepare_all(gate_fit, contract, cache, "gatefit")
    _, g_fit = cached("gatefit", x_fit)
    s_tune = fit_knee_gate(net, g_fit, np.array([s.grade for s in gate_fit]), g_tune, k)
    threshold_koa = float(np.quantile(s_tune, args.gate_quantile))
    film_knees = tune_film_knees(args.films, args.boxes, contract)
    s_films = gate_scores(net, cached("tunefilms", film_knees)[1]) if len(film_knees) else np.zeros(0)
    threshold = max(threshold_koa, float(s_films.max()) if len(s_films) else threshold_koa)
    # how often a knee like the tune fold's is refused at a threshold placed this way on half as many
    # knees: the threshold from one random half of the tune fold, the refusals counted on the other
    half = len(s_tune) // 2
    rng_h = np.random.default_rng(args.seed)
    halves = [rng_h.permutation(len(s_tune)) for _ in range(200)]
    split_half = float(
        np.mean([(s_tune[h[half:]] > np.quantile(s_tune[h[:half]], args.gate_quantile)).mean() for h in halves])
    )

    # 3. the uncertain flag, chosen on val for the stated coverage
    fit = fits[post.flip_tta]
    p_val = view_probabilities(views[post.flip_tta][1], post)
    g_val = decode_grades(p_val, post)
    conf_val = p_val[np.arange(len(g_val)), g_val]
    uncertain_below = float(np.quantile(conf_val, 1.0 - args.coverage))

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
