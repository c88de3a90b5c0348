"""Fitting the knee gate (`model.gate`) of a grader: features, per-layer statistics, scores.

Shared by `train.calibrate` (the whole calibration of a run) and `train.refit_gate` (the gate
alone); both fit it on the knees and on copies framed as other sites frame knees (`train.framings`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from tqdm import tqdm

from model.contract import InputContract
from model.decode import decode_image
from model.localize import Joint, crop_joint
from model.preprocess import as_float_image, prepare, to_model_input
from train.data import Sample, prepare_all
from train.films import film_split, read_boxes
from train.framings import random_framing


def framed_images(
    samples: list[Sample], contract: InputContract, share: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Which of ``samples`` (a ``share`` of them) and their (N', S, S) prepared framed copies (one
    random framing each)."""
    rng = np.random.default_rng([seed, 7])
    n = len(samples)
    chosen = np.sort(rng.choice(n, round(share * n), replace=False)) if share < 1 else np.arange(n)
    out = []
    for i in tqdm(chosen, desc="framings", leave=False, dynamic_ncols=True):
        image = as_float_image(decode_image(samples[i].path.read_bytes(), max_pixels=contract.max_pixels))
        out.append(prepare(random_framing(image, rng), contract))
    return chosen, np.stack(out) if out else np.zeros((0, contract.input_size, contract.input_size), np.uint8)


@torch.inference_mode()
def gate_features(
    net: torch.nn.Module, images: np.ndarray, contract: InputContract, batch_size: int = 32
) -> tuple[np.ndarray, list[np.ndarray]]:
    """(N, S, S) prepared uint8 images -> (N, D) pooled features and the gate's L (N, D_l) layers."""
    pooled, layers = [], []
    for i in tqdm(range(0, len(images), batch_size), desc="features", leave=False):
        chunk = images[i : i + batch_size]
        x = torch.from_numpy(np.stack([to_model_input(np.ascontiguousarray(im), contract) for im in chunk]))
        f, taps = net.forward_gate_features(x.contiguous(memory_format=torch.channels_last))
        pooled.append(f.float().numpy())
        layers.append([t.float().numpy() for t in taps])
    return np.concatenate(pooled), [np.concatenate(col) for col in zip(*layers, strict=True)]


def fit_gate(features: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Class means (K, D) and the shared precision (D, D) of class-centred features (Ledoit-Wolf shrinkage)."""
    means = np.stack([features[labels == c].mean(0) for c in range(k)])
    centred = features - means[labels]
    cov = LedoitWolf(assume_centered=True).fit(centred)
    return means.astype(np.float32), cov.precision_.astype(np.float32)


@torch.inference_mode()
def layer_scores(net: torch.nn.Module, layers: list[np.ndarray]) -> np.ndarray:
    """(N, L) each gate layer's raw squared Mahalanobis distance."""
    return net.knee_gate.layer_scores([torch.from_numpy(f) for f in layers]).numpy()


@torch.inference_mode()
def gate_scores(net: torch.nn.Module, layers: list[np.ndarray]) -> np.ndarray:
    """(N,) the gate's score: the largest standardised layer score."""
    return net.knee_gate([torch.from_numpy(f) for f in layers]).numpy()


def fit_knee_gate(
    net: torch.nn.Module, fit_layers: list[np.ndarray], fit_labels: np.ndarray, ref_layers: list[np.ndarray], k: int
) -> np.ndarray:
    """Fit every gate layer on training knees, standardise each on the reference knees; returns
    the reference knees' (N,) gate scores.

    Each layer's class means and shrunk covariance come from ``fit_layers`` (knees the weights
    trained on); its location and scale are the mean and standard deviation of its scores on
    ``ref_layers`` (knees the weights never trained on: the tune fold), which the trained-on knees
    would understate.
    """
    for i, f in enumerate(fit_layers):
        means, precision = fit_gate(f, fit_labels, k)
        net.knee_gate.set_statistics(i, torch.from_numpy(means), torch.from_numpy(precision))
    raw = layer_scores(net, ref_layers)
    net.knee_gate.set_standardisation(torch.from_numpy(raw.mean(0)).float(), torch.from_numpy(raw.std(0)).float())
    return gate_scores(net, ref_layers)


def gate_fit_knees(samples: list[Sample], tune: list[Sample], most: int, seed: int) -> list[Sample]:
    """The training knees the gate is fitted on: up to ``most`` of the train split outside the tune fold,
    drawn with ``seed`` (the same for `train.calibrate` and `train.refit_gate`)."""
    tune_set = {str(s.path) for s in tune}
    pool = [s for s in samples if s.split == "train" and str(s.path) not in tune_set]
    picks = sorted(np.random.default_rng(seed).choice(len(pool), min(most, len(pool)), False))
    return [pool[i] for i in picks]


@dataclass(frozen=True)
class FramedFit:
    """The gate fitted on training knees and their framed copies: the tune fold's scores (its knees,
    then their framed copies) and how many framed copies joined each set."""

    tune_scores: np.ndarray
    tune_knees: int
    fit_copies: int
    tune_copies: int


def fit_framed_gate(
    net: torch.nn.Module,
    contract: InputContract,
    gate_fit: list[Sample],
    tune: list[Sample],
    share: float,
    seed: int,
    layers: Callable[[str, np.ndarray], list[np.ndarray]],
    tune_layers: list[np.ndarray] | None = None,
    cache_dir: str | None = None,
) -> FramedFit:
    """`fit_knee_gate` on ``gate_fit``'s knees and tune's, each set joined by ``share`` of framed copies
    (`framed_images`; none when 0). ``layers(name, images)`` gives the gate's layers of prepared images
    (a cache may keep them under ``name``); ``tune_layers``, the tune knees' when already read."""
    fit_layers = layers("gatefit", prepare_all(gate_fit, contract, cache_dir, "gatefit"))
    if tune_layers is None:
        tune_layers = layers("tune", prepare_all(tune, contract, cache_dir, "tune"))
    labels = np.array([s.grade for s in gate_fit])
    fit_copies = tune_copies = 0
    if share > 0:
        idx, framed = framed_images(gate_fit, contract, share, seed)
        _, tune_framed = framed_images(tune, contract, share, seed + 1)
        fit_layers = _joined(fit_layers, layers("gatefit-framed", framed))
        tune_layers = _joined(tune_layers, layers("tune-framed", tune_framed))
        labels = np.concatenate([labels, labels[idx]])
        fit_copies, tune_copies = len(framed), len(tune_framed)
    scores = fit_knee_gate(net, fit_layers, labels, tune_layers, contract.num_classes)
    return FramedFit(scores, len(tune), fit_copies, tune_copies)


def _joined(a: list[np.ndarray], b: list[np.ndarray]) -> list[np.ndarray]:
    """Two sets of the gate's layers, one after the other."""
    return [np.concatenate([x, y]) for x, y in zip(a, b, strict=True)]


def tune_film_knees(films: str | None, boxes: str | None, contract) -> np.ndarray:
    """The prepared AP knees of the ``tune`` leg films, cut as the server cuts them (none without the films)."""
    if not films or not boxes or not Path(films).is_dir() or not Path(boxes).is_file():
        return np.zeros((0, contract.input_size, contract.input_size), np.uint8)
    out = []
    for name, rows in sorted(read_boxes(boxes).items()):
        if film_split(name) != "tune":
            continue
        gray = as_float_image(decode_image((Path(films) / name).read_bytes()))
        for r in rows:
            if r["view"] == "ap" and r["box"]:
                out.append(prepare(crop_joint(gray, Joint(tuple(r["box"]), "ap", 1.0)), contract))
    return np.stack(out) if out else np.zeros((0, contract.input_size, contract.input_size), np.uint8)


# The made-up negatives that are not refused by every candidate (noise, a page of text and flat gray are).
HARD = (
    "knee upside down",
    "femur shaft only (joint cut off)",
    "tibia only (joint cut off)",
    "knee rotated 90",
    "2x2 tile of knees",
    "photographs (2 photos, crops)",
    "ellipse phantoms",
)


def gate_threshold(s_tune: np.ndarray, s_films: np.ndarray, quantile: float) -> tuple[float, float]:
    """The refusal threshold from the dataset's knees alone (the ``quantile`` of the tune fold's
    scores), and the one used: raised where needed to let every tune leg film's AP knee through."""
    threshold_koa = float(np.quantile(s_tune, quantile))
    threshold = max(threshold_koa, float(s_films.max()) if len(s_films) else threshold_koa)
    return threshold_koa, threshold


def split_half_refusals(s_tune: np.ndarray, quantile: float, seed: int) -> float:
    """How often a knee like the tune fold's is refused at a threshold placed this way on half as many
    knees: the threshold from one random half of the tune fold, the refusals counted on the other."""
    half = len(s_tune) // 2
    rng_h = np.random.default_rng(seed)
    halves = [rng_h.permutation(len(s_tune)) for _ in range(200)]
    return float(np.mean([(s_tune[h[half:]] > np.quantile(s_tune[h[:half]], quantile)).mean() for h in halves]))
