"""The figures of a site check, each with a 95% bootstrap interval, and the decision against thresholds.

Pure functions of arrays (labels, calibrated probabilities, grades, flags), so that the shipped
decoding and a site profile are measured the same way. The thresholds are a small config written
before the run (`Thresholds`, `sites/acceptance.json`); the decision and its reasons are data.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata

from train.site_fit import ece, qwk

__all__ = ["Thresholds", "bootstrap", "decide", "figures", "unlabelled_figures"]

K = 5


@dataclass(frozen=True)
class Thresholds:
    """What a site must show before it goes live; written before the run (``sites/acceptance.json``)."""

    min_qwk: float = 0.75  # the lower end of the interval must clear this
    min_top1: float = 0.50
    max_refused_share: float = 0.10  # of the site's knees, refused by the served path
    max_ece: float = 0.15
    min_knees_per_grade: int = 10  # fewer: that grade's recall cannot be told
    min_knees: int = 50  # fewer: the whole check is too small to decide
    max_interval_width: float = 0.25  # a QWK or top-1 interval wider than this cannot decide
    bootstrap: int = 1000

    @classmethod
    def load(cls, path: str | Path | None) -> Thresholds:
        if path is None or not Path(path).is_file():
            return cls()
        data = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known - {"comment"}
        if unknown:
            raise ValueError(f"{path}: unknown thresholds {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: v for k, v in data.items() if k in known})


def auc_ovr(y: np.ndarray, p: np.ndarray) -> list[float | None]:
    """Per-class one-vs-rest AUC, ties counted one half: `train.metrics.roc_auc_ovr` without its input checks
    and sklearn's overhead (the bootstrap calls it a thousand times; tests/test_sites.py compares them)."""
    out: list[float | None] = []
    for c in range(p.shape[1]):
        pos = y == c
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        if not n_pos or not n_neg:
            out.append(None)
            continue
        r = rankdata(p[:, c])
        out.append(float((r[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)))
    return out


def _recall(y: np.ndarray, g: np.ndarray, grade: int) -> float | None:
    m = y == grade
    return float((g[m] == grade).mean()) if m.any() else None


def point_figures(y: np.ndarray, p: np.ndarray, g: np.ndarray, unc: np.ndarray) -> dict[str, Any]:
    """The site's figures on one set of answers (labels ``y``, probabilities ``p``, grades ``g``, flags ``unc``)."""
    aucs = [a for a in auc_ovr(y, p) if a is not None]
    ok = ~unc
    return {
        "top1": float((g == y).mean()),
        "qwk": qwk(y, g, K) if len(y) > 1 else None,
        "mae": float(np.abs(g - y).mean()),
        "macro_auc": float(np.mean(aucs)) if aucs else None,
        "ece": ece(y, p),
        "uncertain_share": float(unc.mean()),
        "top1_not_flagged": float((g[ok] == y[ok]).mean()) if ok.any() else None,
        **{f"recall_kl{k}": _recall(y, g, k) for k in range(K)},
    }


def bootstrap(
    y: np.ndarray, p: np.ndarray, g: np.ndarray, unc: np.ndarray, n: int = 1000, seed: int = 0
) -> dict[str, dict[str, float | None]]:
    """Each figure of `point_figures` with its 95% percentile interval over ``n`` resamples of the knees."""
    point = point_figures(y, p, g, unc)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(n):
        i = rng.integers(0, len(y), len(y))
        for key, v in point_figures(y[i], p[i], g[i], unc[i]).items():
            if v is not None and np.isfinite(v):
                draws[key].append(v)
    out = {}
    for key, v in point.items():
        d = draws[key]
        lo, hi = (float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))) if len(d) > 10 else (None, None)
        out[key] = {"value": v, "low": lo, "high": hi}
    return out


def share_interval(k: int, n: int) -> dict[str, float]:
    """A share k/n with its 95% Wilson interval."""
    if n == 0:
        return {"value": 0.0, "low": 0.0, "high": 1.0}
    z, p = 1.96, k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"value": p, "low": float(max(0.0, c - h)), "high": float(min(1.0, c + h))}


def confusion(y: np.ndarray, g: np.ndarray) -> list[list[int]]:
    cm = np.zeros((K, K), dtype=int)
    np.add.at(cm, (y, g), 1)
    return cm.tolist()


def figures(y: np.ndarray, p: np.ndarray, g: np.ndarray, unc: np.ndarray, n_boot: int, seed: int = 0) -> dict:
    """Figures with intervals, the confusion matrix and the counts of one set of answers."""
    return {"n": int(len(y)), "figures": bootstrap(y, p, g, unc, n_boot, seed), "confusion": confusion(y, g)}


def unlabelled_figures(p: np.ndarray, g: np.ndarray, unc: np.ndarray) -> dict[str, Any]:
    """What can be known without labels: the grade mix answered and the uncertain share."""
    counts = np.bincount(g, minlength=K)
    return {
        "n": int(len(g)),
        "answered_grade_mix": (counts / max(len(g), 1)).round(4).tolist(),
        "uncertain": share_interval(int(unc.sum()), len(g)),
        "mean_expected_grade": float((p @ np.arange(K)).mean()) if len(g) else None,
    }


def decide(report: dict[str, Any], t: Thresholds) -> dict[str, Any]:
    """The decision (``go``, ``no-go`` or ``cannot tell``) against the thresholds, with every reason."""
    reasons, warnings = [], []
    refused = report["refused"]
    if refused["high"] > t.max_refused_share and refused["value"] > t.max_refused_share:
        reasons.append(f"refused share {refused['value']:.1%} is above {t.max_refused_share:.0%}")
    n = report["sample"]["knees"]
    if n < t.min_knees:
        warnings.append(f"{n} knees: fewer than {t.min_knees}, too few to decide")
    answers = report.get("served")
    if answers is None:
        warnings.append("no labels: accuracy cannot be known; only refusals, flags and the grade mix are reported")
        return {"decision": "cannot tell", "reasons": reasons, "warnings": warnings, "thresholds": asdict(t)}
    counts = report["sample"]["grade_counts"]
    few = [f"KL{g} ({c})" for g, c in enumerate(counts) if c < t.min_knees_per_grade]
    if few:
        warnings.append(f"fewer than {t.min_knees_per_grade} knees of {', '.join(few)}: their recall cannot be told")
    use = report.get("profile_figures") or answers
    f = use["figures"]
    for key, floor in (("qwk", t.min_qwk), ("top1", t.min_top1)):
        v = f[key]
        if v["value"] is None:
            warnings.append(f"{key} cannot be computed on {use['n']} answers")
            continue
        if v["high"] is not None and v["high"] < floor:
            reasons.append(f"{key} {v['value']:.3f} (95% CI {v['low']:.3f}-{v['high']:.3f}) is below {floor}")
        elif v["low"] is not None and v["high"] - v["low"] > t.max_interval_width:
            warnings.append(f"{key} interval {v['low']:.3f}-{v['high']:.3f} is wider than {t.max_interval_width}")
        elif v["low"] is not None and v["low"] < floor:
            warnings.append(f"{key} {v['value']:.3f}: its interval reaches below {floor}")
    if f["ece"]["value"] is not None and f["ece"]["value"] > t.max_ece:
        reasons.append(f"ECE {f['ece']['value']:.3f} is above {t.max_ece}")
    if reasons:
        decision = "no-go"
    elif any("too few" in w or "wider" in w or "reaches below" in w for w in warnings):
        decision = "cannot tell"
    else:
        decision = "go"
    return {"decision": decision, "reasons": reasons, "warnings": warnings, "thresholds": asdict(t)}
