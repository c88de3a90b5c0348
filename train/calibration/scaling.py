"""Calibration of a grader's logits: none, a temperature, or a temperature with a bias per class.

Each is fitted by negative log-likelihood on (N, K) logits, or on (N, V, K) logits of V views of each
knee (the image and its mirror), calibrated as they are served (`view_probabilities`).
"""

from __future__ import annotations

import numpy as np

from model.contract import PostprocessConfig
from model.postprocess import calibrated_probabilities


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
        return mean_nll(view_probabilities(logits, PostprocessConfig(temperature=t)), labels)

    grid = np.exp(np.linspace(np.log(0.25), np.log(8.0), 121))
    best = min(grid, key=nll)
    fine = best * np.exp(np.linspace(-0.03, 0.03, 31))
    return float(min(fine, key=nll))


def mean_nll(probs: np.ndarray, labels: np.ndarray) -> float:
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
        return mean_nll(view_probabilities(x, cfg), labels)

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
