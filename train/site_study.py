"""How much a site calibration gains, measured on knees its fit did not see; and training's reference.

``python -m train.site_study --site-data ../shared/data/site2 --val ../shared/data/koa`` (``make site-study``)
writes ``docs/results/site_calibration.json`` and ``sites/reference.json``. What is measured: docs/SITES.md
(`train.site_study`).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from model.localize import READINGS, WHOLE
from model.paths import KOA, SITE2
from model.postprocess import decode_grades
from train import site_fit
from train.site_path import KneeRecord, ServedSitePath, arrays, records_of, sha256
from train.site_sample import read_sample

log = logging.getLogger("train.site_study")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--site-data", default=str(SITE2), help="the site's labelled knees (<grade>/<image>)")
    p.add_argument("--site-name", default="site2")
    p.add_argument("--site-credit", default='Gornale, Shivanand; Patravali, Pooja (2020), "Digital Knee X-ray Images", '
                   "Mendeley Data, v1, doi:10.17632/t9ndx37v5h.1 (CC BY 4.0)")  # fmt: skip
    p.add_argument("--val", default=str(KOA), help="the training dataset root (its val/ and train/)")
    p.add_argument("--val-knees", type=int, default=300, help="val knees run through the served path (stratified)")
    p.add_argument("--weights", default="weights/oamen.ckpt")
    p.add_argument("--finder", default="weights/finder.pt")
    p.add_argument("--readings", default=",".join(READINGS), help="ways of reading a joint crop (model.localize)")
    p.add_argument("--draws", type=int, default=20)
    p.add_argument("--repeats", type=int, default=10, help="repeats of the cross-fitting on all knees")
    p.add_argument("--inner-repeats", type=int, default=2, help="repeats of the choice's cross-fitting in a draw")
    p.add_argument("--out", default="docs/results/site_calibration.json")
    p.add_argument("--reference", default="sites/reference.json")
    p.add_argument("--cache", default="cache/site_study", help="the served path's records, keyed by the weights")
    p.add_argument("--seed", type=int, default=0)
    return p


def held_out(
    logits: np.ndarray, labels: np.ndarray, answered: np.ndarray, cfg, test: np.ndarray
) -> dict[str, dict[str, float]]:
    """Top-1, QWK, MAE on the ``test`` knees (all graded, and those answered today) under ``cfg``."""
    p = site_fit.probabilities(logits[test], cfg)
    g = decode_grades(p, cfg)
    y = labels[test]
    out = {"graded": site_fit.held_out_figures(y, p, g, 5)}
    a = answered[test]
    if a.sum() > 5:
        out["answered"] = site_fit.held_out_figures(y[a], p[a], g[a], 5)
    return out


def _mean(figs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for part in ("graded", "answered"):
        rows = [f[part] for f in figs if part in f]
        if rows:
            out[part] = {k: round(float(np.mean([r[k] for r in rows])), 4) for k in ("accuracy", "qwk", "mae")}
            out[part] |= {f"{k}_sd": round(float(np.std([r[k] for r in rows])), 4) for k in ("accuracy", "qwk")}
    return out


Views = dict[str, tuple[np.ndarray, np.ndarray]]  # per reading: (N, V, K) logits, (N,) answered today


def draws(views: Views, labels: np.ndarray, base, prior, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """``args.draws`` random draws of ``n`` labelled knees: the site check's choice and each candidate (a
    method under a reading of the joint crops), fitted on the draw and measured on the other knees."""
    rng = np.random.default_rng(args.seed + n)
    logits = {r: lg for r, (lg, _) in views.items()}
    names = [site_fit.candidate(r, m) for r in views for m in site_fit.METHODS]
    per_method: dict[str, list] = {name: [] for name in names}
    chosen_figs, chosen_names = [], []

    def measured(name: str, fit_idx: np.ndarray, test: np.ndarray) -> dict[str, dict[str, float]]:
        reading, m = site_fit.parse(name)
        lg, answered = views[reading]
        cfg = site_fit.fit(m, base, lg[fit_idx], labels[fit_idx], prior, unlabelled=lg[test] if m.em_prior else None)
        return held_out(lg, labels, answered, cfg, test)

    for _ in range(args.draws):
        fit_idx = np.sort(rng.choice(len(labels), n, replace=False))
        test = np.setdiff1d(np.arange(len(labels)), fit_idx)
        for name in names:
            per_method[name].append(measured(name, fit_idx, test))
        cv = site_fit.cross_fit({r: lg[fit_idx] for r, lg in logits.items()}, labels[fit_idx], base,
                                list(site_fit.METHODS), train_prior=prior, repeats=args.inner_repeats,
                                seed=int(rng.integers(1 << 30)))  # fmt: skip
        choice = site_fit.choose(cv)
        chosen_names.append(choice)
        chosen_figs.append(measured(choice, fit_idx, test))
    return {
        "knees": n,
        "draws": args.draws,
        "site_check_choice": _mean(chosen_figs) | {"chosen": dict(Counter(chosen_names))},
        "methods": {name: _mean(f) for name, f in per_method.items()},
    }


def views_of(path: ServedSitePath, files: list[Path], grades: list[int], cache: Path, name: str, readings) -> Views:
    """Each reading's (logits, answered) of the files the model graded (the same files under every reading)."""
    out: Views = {}
    for reading in readings:
        path.reading = reading
        lg, _, answered = arrays(records_of(path, files, cache, name), grades)
        out[reading] = (lg, answered)
    path.reading = WHOLE
    return out


def reference(records: list[KneeRecord], train_counts: list[int], path: ServedSitePath, data: str) -> dict:
    scores = np.array([r.gate_score for r in records if r.gate_score is not None])
    stats = np.array([r.stats for r in records if r.stats is not None])
    c = path.contract
    return {
        "model": {"name": c.model_name, "version": c.model_version, "weights_sha256": sha256(path.weights)},
        "data": data,
        "knees": len(records),
        "gate_scores": {f"p{q}": round(float(np.percentile(scores, q)), 4) for q in (5, 50, 90, 95, 99)},
        "image_mean": round(float(stats[:, 0].mean()), 3),
        "image_sd": round(float(stats[:, 1].mean()), 3),
        "train_grade_counts": train_counts,
        "train_grade_mix": [round(x / sum(train_counts), 4) for x in train_counts],
        "answered_share": round(float(np.mean([r.answered for r in records])), 4),
    }


def main(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    path = ServedSitePath(args.weights, args.finder)
    base = path.contract.postprocess
    cache = Path(args.cache)
    train = read_sample(Path(args.val) / "train")
    train_counts = train.grade_counts()
    val = read_sample(Path(args.val) / "val")
    rng = np.random.default_rng(args.seed)
    share = min(1.0, args.val_knees / len(val.files))
    pick = sorted(i for g in range(5) for i in np.flatnonzero(np.asarray(val.grades) == g)
                  if rng.random() < share)  # fmt: skip
    val_files = [val.files[i] for i in pick]
    val_grades = [val.grades[i] for i in pick]
    val_records = records_of(path, val_files, cache, "val")
    ref = reference(val_records, train_counts, path, f"{args.val}/val ({len(val_records)} knees, stratified)")
    Path(args.reference).parent.mkdir(parents=True, exist_ok=True)
    Path(args.reference).write_text(json.dumps(ref, indent=2) + "\n")
    prior = np.asarray(ref["train_grade_mix"])

    site = read_sample(args.site_data)
    site_records = records_of(path, site.files, cache, args.site_name)
    _, labels, answered = arrays(site_records, site.grades)
    readings = [r for r in args.readings.split(",") if r]
    views = views_of(path, site.files, site.grades, cache, args.site_name, readings)
    result: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "model": ref["model"],
        "finder_sha256": sha256(path.finder_weights),
        "site": {
            "name": args.site_name,
            "credit": args.site_credit,
            "knees": len(site_records),
            "graded": len(labels),
            "answered_today": int(answered.sum()),
            "grade_counts": site.grade_counts(),
            "refusals": dict(Counter(f"{r.outcome} ({r.refused_by})" for r in site_records if not r.answered)),
        },
        "readings": readings,
        "methods": {
            n: site_fit.describe(n) for n in (site_fit.candidate(r, m) for r in readings for m in site_fit.METHODS)
        },
        "rule": site_fit.rule_text(),
    }
    cv = site_fit.cross_fit({r: lg for r, (lg, _) in views.items()}, labels, base, list(site_fit.METHODS),
                            train_prior=prior, repeats=args.repeats, seed=args.seed)  # fmt: skip
    result["cross_fitted_all"] = {
        "protocol": f"5-fold stratified, {args.repeats} repeats, every labelled knee the model graded",
        "methods": {m: {k: round(v, 4) for k, v in f.items()} for m, f in cv.items()},
        "chosen": site_fit.choose(cv),
    }
    for n in (50, 100):
        log.info("draws of %d knees", n)
        result[f"from_{n}"] = draws(views, labels, base, prior, n, args)
    vy = arrays(val_records, val_grades)[1]
    log.info("val: draws of 100 knees")
    val_views = views_of(path, val_files, val_grades, cache, "val", readings)
    result["val"] = {"knees": len(vy), "from_100": draws(val_views, vy, base, prior, 100, args)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    log.info("wrote %s and %s", args.out, args.reference)
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
