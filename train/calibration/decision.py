"""The decision rule of a calibrated grader: the argmax, or cut-points on the expected grade.

The cut-points are fitted on the tune fold to maximise the mean of top-1 accuracy and quadratic kappa.
"""

from __future__ import annotations

import numpy as np

from model.contract import PostprocessConfig
from model.postprocess import decode_grades, expected_grade
from train.metrics import quadratic_weighted_kappa


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


def uncertain_threshold(probs: np.ndarray, post: PostprocessConfig, coverage: float) -> float:
    """The confidence below which the least confident ``1 - coverage`` of the answers fall (the
    uncertain flag), from (N, K) calibrated probabilities decoded by ``post``."""
    grades = decode_grades(probs, post)
    conf = probs[np.arange(len(grades)), grades]
    return float(np.quantile(conf, 1.0 - coverage))
