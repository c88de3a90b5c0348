"""From logits to the answer, as pure functions: calibrated probabilities, the grade, the flag.

Everything is read from the contract's `PostprocessConfig` (fitted by `train.calibrate`), so that the
handler and `train.evaluate` turn the same logits into the same answer. The formulas: docs/MODEL.md,
"Postprocessing".
"""

from __future__ import annotations

import numpy as np

from model.contract import PostprocessConfig

__all__ = [
    "calibrated_probabilities",
    "confidences",
    "decode_grades",
    "expected_grade",
    "finish",
    "refused",
    "split_outputs",
    "uncertain",
]


def _check_logits(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(f"expected (N, K) logits with K >= 2, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("logits have NaN or infinite values")
    return x


def calibrated_probabilities(logits: np.ndarray, cfg: PostprocessConfig) -> np.ndarray:
    """(N, K) logits -> (N, K) probabilities, ``softmax(logits / temperature + class_bias)``."""
    x = _check_logits(logits) / cfg.temperature
    if cfg.class_bias:
        if len(cfg.class_bias) != x.shape[1]:
            raise ValueError(f"{x.shape[1]} classes need {x.shape[1]} class_bias values, got {len(cfg.class_bias)}")
        x = x + np.asarray(cfg.class_bias, dtype=np.float64)
    x = x - x.max(axis=1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=1, keepdims=True)


def expected_grade(probs: np.ndarray) -> np.ndarray:
    """(N, K) probabilities -> (N,) expected grade sum_k k p_k."""
    p = np.asarray(probs, dtype=np.float64)
    return p @ np.arange(p.shape[1], dtype=np.float64)


def decode_grades(probs: np.ndarray, cfg: PostprocessConfig) -> np.ndarray:
    """(N, K) probabilities -> (N,) grades by the contract's decision rule."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"expected (N, K) probabilities, got shape {p.shape}")
    if cfg.decision == "argmax":
        return p.argmax(axis=1).astype(np.int64)
    cuts = np.asarray(cfg.cutpoints, dtype=np.float64)
    if len(cuts) != p.shape[1] - 1:
        raise ValueError(f"{p.shape[1]} classes need {p.shape[1] - 1} cutpoints, got {len(cuts)}")
    return np.searchsorted(cuts, expected_grade(p), side="right").astype(np.int64)


def confidences(probs: np.ndarray, grades: np.ndarray) -> np.ndarray:
    """(N,) probability of the grade each answer gives."""
    p = np.asarray(probs, dtype=np.float64)
    g = np.asarray(grades, dtype=np.int64)
    return p[np.arange(len(g)), g]


def uncertain(conf: np.ndarray, cfg: PostprocessConfig) -> np.ndarray:
    """(N,) bool: answers a reader should double-check (confidence below the threshold)."""
    return np.asarray(conf, dtype=np.float64) < cfg.uncertain_below


def refused(gate_scores: np.ndarray | None, cfg: PostprocessConfig) -> np.ndarray | None:
    """(N,) bool: images the knee gate refuses (None when the contract has no gate)."""
    if cfg.gate == "none" or gate_scores is None:
        return None
    return np.asarray(gate_scores, dtype=np.float64) > cfg.gate_threshold


def split_outputs(outputs: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray | None]:
    """A model's (N, K) logits or (N, K + 1) logits-and-gate-score -> (logits, gate scores or None)."""
    out = np.asarray(outputs, dtype=np.float64)
    if out.ndim != 2 or out.shape[1] not in (num_classes, num_classes + 1):
        raise ValueError(f"expected (N, {num_classes}) or (N, {num_classes + 1}) outputs, got shape {out.shape}")
    if out.shape[1] == num_classes:
        return out, None
    return out[:, :num_classes], out[:, num_classes]


def finish(
    outputs: np.ndarray, cfg: PostprocessConfig, num_classes: int, outputs_flipped: np.ndarray | None = None
) -> dict[str, np.ndarray | None]:
    """Model outputs (and, with ``flip_tta``, those of the mirrored images) -> the answer's arrays.

    Returns a dict of (N,)-leading arrays: ``probabilities`` (N, K), ``grades``, ``confidence``,
    ``uncertain``, ``gate_scores`` and ``refused`` (None without a gate). The gate reads the
    unmirrored image only.
    """
    logits, gate = split_outputs(outputs, num_classes)
    probs = calibrated_probabilities(logits, cfg)
    if cfg.flip_tta:
        if outputs_flipped is None:
            raise ValueError("the contract averages mirrored images (flip_tta): pass their outputs too")
        probs = 0.5 * (probs + calibrated_probabilities(split_outputs(outputs_flipped, num_classes)[0], cfg))
    grades = decode_grades(probs, cfg)
    conf = confidences(probs, grades)
    return {
        "probabilities": probs,
        "grades": grades,
        "confidence": conf,
        "uncertain": uncertain(conf, cfg),
        "gate_scores": gate,
        "refused": refused(gate, cfg),
    }
