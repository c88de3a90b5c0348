"""The whole decoding of a grader's logits chosen on the tune fold: calibration, decision rule, mirror averaging.

For each way of reading an image (once, or averaged with its mirror, each calibrated on its own), the
calibration is chosen and fitted (`train.calibration.choice`) and its decision rule fitted
(`train.calibration.decision`); mirror averaging, which doubles the grader's cost, is kept only for a
real gain on the tune fold.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from model.postprocess import decode_grades
from train.calibration.choice import (
    FIT_SETS,
    choose_calibration,
    choose_fit_set,
    cross_fitted_val_ece,
    cross_validate_calibration,
    fit_set_data,
)
from train.calibration.decision import decision_score, fit_cutpoints
from train.calibration.scaling import fit_calibration, view_probabilities
from train.metrics import quadratic_weighted_kappa


def choose_answer(
    views: dict[bool, tuple[np.ndarray, np.ndarray]],
    y_tune: np.ndarray,
    groups: np.ndarray,
    val: tuple[np.ndarray, np.ndarray],
    k: int,
    fit_on: str = "auto",
    flip: str = "auto",
    seed: int = 0,
) -> tuple[dict[bool, dict[str, Any]], dict[str, dict[str, Any]], dict[str, Any]]:
    """The fits per way of reading (``views``: mirrored or not -> (tune logits, val logits)), every
    candidate decoding with its tune-fold figures, and the one chosen (its ``config`` is the answer's
    `PostprocessConfig`). ``val`` is (labels, patient groups); ``fit_on`` and ``flip`` as
    `train.calibrate`'s ``--fit-on`` and ``--flip``."""
    fit_on_rule, flip_rule = fit_on, flip
    fits: dict[bool, dict[str, Any]] = {}
    candidates: dict[str, dict[str, Any]] = {}
    for flip, (lt, lv) in views.items():
        calibration_cv = cross_validate_calibration(lt, y_tune, groups, seed=seed)
        calibration = choose_calibration(calibration_cv)
        fit_sets = {s: cross_fitted_val_ece((lt, y_tune), (lv, *val), calibration, s, seed=seed) for s in FIT_SETS}
        fit_on = choose_fit_set(fit_sets) if fit_on_rule == "auto" else fit_on_rule
        fitted = fit_calibration(*fit_set_data(fit_on, (lt, y_tune), (lv, val[0])), calibration)
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
    if flip_rule == "auto":
        chosen = best_flip if best_flip["tune_score"] > best_plain["tune_score"] + 0.005 else best_plain
    else:
        chosen = best_flip if flip_rule == "on" else best_plain
    return fits, candidates, chosen
