"""Which calibration, fitted on what: chosen by patient-grouped cross-validation, by rules stated beforehand.

The method is chosen inside the tune fold (`cross_validate_calibration`, `choose_calibration`); the
set it is fitted on (the tune fold, val, or both) by cross-fitting on val (`cross_fitted_val_ece`,
`choose_fit_set`). docs/TRAINING.md (`train.calibrate`) explains the rules.
"""

from __future__ import annotations

import numpy as np

from train.calibration.scaling import CALIBRATIONS, fit_calibration, mean_nll, view_probabilities
from train.metrics import expected_calibration_error

FIT_SETS = ("tune", "tune+val", "val")


def patient_folds(groups: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """(N,) the fold of each knee: patients dealt round-robin into ``folds`` in a seeded random order,
    so both knees of a patient fall in one fold."""
    order = np.random.default_rng(seed).permutation(np.unique(groups))
    fold_of = {g: i % folds for i, g in enumerate(order)}
    return np.array([fold_of[g] for g in groups])


def cross_validate_calibration(
    logits: np.ndarray, labels: np.ndarray, groups: np.ndarray, folds: int = 5, repeats: int = 10, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Each of `CALIBRATIONS` fitted on k-1 folds of the tune fold and measured on the k-th.

    Folds are patient-grouped (both knees of a patient fall in one fold); the split is repeated
    ``repeats`` times because the 15-bin ECE of a few hundred knees is noisy. Returns, per method,
    the mean and standard deviation over repeats of the out-of-fold ECE, and the mean NLL and top-1.
    """
    out: dict[str, dict[str, list[float]]] = {m: {"ece": [], "nll": [], "accuracy": []} for m in CALIBRATIONS}
    for r in range(repeats):
        fid = patient_folds(groups, folds, seed + r)
        for m in CALIBRATIONS:
            p = np.zeros((len(logits), logits.shape[-1]))
            for f in range(folds):
                fit, held = fid != f, fid == f
                p[held] = view_probabilities(logits[held], fit_calibration(logits[fit], labels[fit], m))
            out[m]["ece"].append(expected_calibration_error(labels, p))
            out[m]["nll"].append(mean_nll(p, labels))
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
        nlls.append(mean_nll(p, yv))
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
