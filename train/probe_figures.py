"""Figures the site probes share: a grader's weights read alone, and a site profile's cut-points refitted on
part of a site's knees and measured on the others (`train.grader_framings_probe`, `train.site_reframe_probe`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from model.contract import PostprocessConfig
from train import site_fit


def raw_figures(logits: np.ndarray, labels: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
    """Top-1, QWK, mean grade minus label and Spearman of the expected grade, of the weights alone."""
    p = site_fit.probabilities(logits, PostprocessConfig())
    grades, e = p.argmax(1), (p * np.arange(p.shape[1])).sum(1)
    figs = {
        "knees": len(labels),
        "accuracy": round(float(np.mean(grades == labels)), 4),
        "qwk": round(site_fit.qwk(labels, grades, p.shape[1]), 4),
        "mean_grade_minus_label": round(float(np.mean(grades - labels)), 3),
        "spearman_expected_grade": round(float(spearmanr(e, labels)[0]), 4),
    }
    return figs, p


def profile_draws(p: np.ndarray, labels: np.ndarray, knees: int, draws: int, seed: int) -> dict[str, float]:
    """Cut-points refitted on ``knees`` random knees, measured on the others; mean and sd over ``draws``."""
    rng = np.random.default_rng(seed)
    e = (p * np.arange(p.shape[1])).sum(1)
    acc, qwk = [], []
    for _ in range(draws):
        fit = np.sort(rng.choice(len(labels), knees, replace=False))
        test = np.setdiff1d(np.arange(len(labels)), fit)
        grades = np.searchsorted(np.asarray(site_fit.fit_cutpoints(p[fit], labels[fit])), e[test])
        acc.append(np.mean(grades == labels[test]))
        qwk.append(site_fit.qwk(labels[test], grades, p.shape[1]))
    return {
        "accuracy": round(float(np.mean(acc)), 4),
        "accuracy_sd": round(float(np.std(acc)), 4),
        "qwk": round(float(np.mean(qwk)), 4),
        "qwk_sd": round(float(np.std(qwk)), 4),
    }


def write_result(out: str | Path, result: dict[str, Any]) -> None:
    """Write a probe's result as indented JSON, its folder made if needed."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    logging.getLogger(__name__).info("wrote %s", out)
