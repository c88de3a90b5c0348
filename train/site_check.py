"""Site acceptance: a hospital's own knees through the served request path, its calibration, its report.

``python -m train.site_check --site NAME --data FOLDER_OR_CSV`` (``make site-check SITE=... DATA=...``)
writes ``sites/NAME/`` (report, figures, and ``profile.json`` when a site calibration wins).
docs/SITES.md is the guide; what the report holds: docs/SITES.md (`train.site_check`).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from model.contract import PostprocessConfig
from model.localize import READINGS, WHOLE
from model.postprocess import confidences, decode_grades, uncertain
from model.profile import FITTED_FIELDS, ProfileError, SiteProfile, load_profile
from train import site_fit
from train.metrics import reliability_bins
from train.site_markdown import render_markdown, write_figures
from train.site_path import KneeRecord, ServedSitePath, sha256
from train.site_report import Thresholds, decide, figures, share_interval, unlabelled_figures
from train.site_sample import Sample, SampleError, read_sample

log = logging.getLogger("train.site_check")

SITES = Path("sites")
REFERENCE = SITES / "reference.json"
# A calibration is fitted only where there is something to fit on: fewer labelled knees than this and
# the cut-points would follow a handful of knees (docs/SITES.md, how many knees).
MIN_FIT_KNEES = 30
LABEL_FREE = ("em-prior",)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--site", required=True, help="the site's name (lower case, digits, _.-): sites/NAME/")
    p.add_argument("--data", required=True, help="a folder of <grade>/<image>, a CSV of file,grade, or images")
    p.add_argument("--weights", default="weights/oamen.ckpt", help="the grader (default: the shipped weights)")
    p.add_argument("--finder", default="weights/finder.pt", help="the knee-joint finder (default: the shipped one)")
    p.add_argument("--out", default=str(SITES), help="where sites/NAME/ is written")
    p.add_argument("--thresholds", default=str(SITES / "acceptance.json"), help="the decision's thresholds")
    p.add_argument("--reference", default=str(REFERENCE), help="training's reference (make site-study writes it)")
    p.add_argument("--methods", default=",".join(site_fit.METHODS), help="site calibrations to compare")
    p.add_argument("--readings", default=",".join(READINGS), help="ways of reading a joint crop to compare "
                   "(model.localize.READINGS; each costs one more pass over the sample)")  # fmt: skip
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=4, help="repeats of the cross-fitting (more: slower, steadier)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None, help="default: the server's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def fit_array(records: list[KneeRecord], views: int) -> tuple[np.ndarray, np.ndarray]:
    """(M, V, K) logits of the knees the model saw (answered or refused after grading), and their indices."""
    idx = np.array([i for i, r in enumerate(records) if r.fit_logits is not None], dtype=np.int64)
    if not len(idx):
        return np.zeros((0, views, 5)), idx
    return np.stack([records[i].fit_logits for i in idx]), idx


def answers(logits: np.ndarray, cfg: PostprocessConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probabilities, grades, uncertain flags) of (N, V, K) logits under ``cfg``, as the server answers."""
    p = site_fit.probabilities(logits, cfg)
    g = decode_grades(p, cfg)
    return p, g, uncertain(confidences(p, g), cfg)


def out_of_fold(
    logits: np.ndarray, labels: np.ndarray, base: PostprocessConfig, m: site_fit.Method, prior, folds: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every knee answered by the method ``m`` fitted on the other folds: honest 'after' figures."""
    fid = site_fit.stratified_folds(labels, folds, np.random.default_rng(seed))
    p = np.zeros((len(labels), logits.shape[-1]))
    g = np.zeros(len(labels), dtype=np.int64)
    u = np.zeros(len(labels), dtype=bool)
    for f in range(folds):
        tr, te = fid != f, fid == f
        cfg = site_fit.fit(m, base, logits[tr], labels[tr], prior, unlabelled=logits[te] if m.em_prior else None)
        p[te], g[te], u[te] = answers(logits[te], cfg)
    return p, g, u


def distance(records: list[KneeRecord], reference: dict[str, Any] | None) -> dict[str, Any]:
    """How far the site's images sit from training's: the knee gate's score (a Mahalanobis distance of the
    model's features to the training knees', standardised on knees it never trained on) and the prepared
    images' brightness and contrast, against the same on the val split (`reference`)."""
    scores = np.array([r.gate_score for r in records if r.gate_score is not None])
    stats = np.array([r.stats for r in records if r.stats is not None])
    out: dict[str, Any] = {
        "gate_score_median": float(np.median(scores)) if len(scores) else None,
        "gate_score_p90": float(np.percentile(scores, 90)) if len(scores) else None,
        "image_mean": float(stats[:, 0].mean()) if len(stats) else None,
        "image_sd": float(stats[:, 1].mean()) if len(stats) else None,
    }
    if reference and len(scores):
        ref = reference["gate_scores"]
        out["reference"] = {k: reference[k] for k in ("model", "data", "knees")} | {"gate_scores": ref}
        out["above_val_p95"] = float((scores > ref["p95"]).mean())
        out["score"] = float((np.median(scores) - ref["p50"]) / max(ref["p95"] - ref["p50"], 1e-6))
        out["image_mean_val"] = reference["image_mean"]
        out["image_sd_val"] = reference["image_sd"]
    return out


def calibrate(
    records: dict[str, list[KneeRecord]], sample: Sample, base: PostprocessConfig, prior, args: argparse.Namespace
) -> dict[str, Any] | None:
    """The site calibrations cross-fitted on the labelled knees the model saw, under each reading of the
    joint crops (``records`` per reading, the shipped ``whole`` first); the chosen one fitted on all."""
    views = 2 if base.flip_tta else 1
    logits, idx = fit_array(records[WHOLE], views)
    if not sample.labelled or len(idx) < MIN_FIT_KNEES:
        return None
    by_reading = {WHOLE: logits}
    for reading, recs in records.items():
        lg, idx_r = fit_array(recs, views)
        if np.array_equal(idx_r, idx):  # the same knees were graded (they are: only the crop's cut differs)
            by_reading[reading] = lg
        else:
            log.warning("reading %s graded other files than the whole reading: not compared", reading)
    labels = np.asarray(sample.grades)[idx]
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in site_fit.METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {list(site_fit.METHODS)}")
    if prior is None:
        methods = [m for m in methods if not site_fit.METHODS[m].em_prior]
    if "shipped" not in methods:
        methods.insert(0, "shipped")
    t0 = time.perf_counter()
    cv = site_fit.cross_fit(
        by_reading, labels, base, methods, train_prior=prior, folds=args.folds, repeats=args.repeats, seed=args.seed
    )
    chosen = site_fit.choose(cv)
    reading, method = site_fit.parse(chosen)
    cfg = site_fit.fit(method, base, by_reading[reading], labels, prior)
    p, g, u = out_of_fold(by_reading[reading], labels, base, method, prior, args.folds, args.seed)
    return {
        "knees": len(idx),
        "index": idx,
        "answered": np.array([r.answered for r in records[reading]]),
        "cv": cv,
        "rule": site_fit.rule_text(),
        "chosen": chosen,
        "reading": reading,
        "config": cfg,
        "oof": (labels, p, g, u),
        "seconds": time.perf_counter() - t0,
    }


def next_version(folder: Path) -> str:
    try:
        return str(int(load_profile(folder / "profile.json").version) + 1)
    except (ProfileError, ValueError):
        return "1"


def per_knee(records: list[KneeRecord], sample: Sample, base: PostprocessConfig, root: str) -> list[dict[str, Any]]:
    rows = []
    for i, r in enumerate(records):
        row: dict[str, Any] = {"file": str(Path(r.file).relative_to(root)) if r.file.startswith(root) else r.file}
        if sample.grades is not None:
            row["grade"] = sample.grades[i]
        row["outcome"] = r.outcome
        if r.answered:
            p, g, u = answers(r.logits[None], base)
            row.update(answered=int(g[0]), confidence=round(float(p[0, g[0]]), 4), uncertain=bool(u[0]))
        else:
            row.update(refused_by=r.refused_by, why=r.message)
        row["gate_score"] = None if r.gate_score is None else round(r.gate_score, 3)
        rows.append(row)
    return rows


def build_report(
    sample: Sample,
    records: list[KneeRecord],
    path: ServedSitePath,
    args: argparse.Namespace,
    seconds: float,
    other_readings: dict[str, list[KneeRecord]] | None = None,
) -> tuple[dict[str, Any], SiteProfile | None]:
    """The report of the records as served (the ``whole`` reading), and the site profile when a calibration
    (under that reading or one of ``other_readings``) wins."""
    c = path.contract
    base = c.postprocess
    t = Thresholds.load(args.thresholds)
    reference = json.loads(Path(args.reference).read_text()) if Path(args.reference).is_file() else None
    # The knee gate's scores belong to one set of weights (a refitted gate keeps the version): match the file.
    if reference and reference["model"].get("weights_sha256") != sha256(path.weights):
        log.warning("the reference %s is for other weights: distance from training not reported (make site-study "
                    "writes it for these)", args.reference)  # fmt: skip
        reference = None
    prior = np.asarray(reference["train_grade_mix"]) if reference else None
    answered = np.array([r.answered for r in records])
    refusals: dict[str, int] = {}
    for r in records:
        if not r.answered:
            refusals[f"{r.outcome} ({r.refused_by})"] = refusals.get(f"{r.outcome} ({r.refused_by})", 0) + 1
    report: dict[str, Any] = {
        "site": args.site,
        "data": sample.source,
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": {"name": c.model_name, "version": c.model_version, "weights_sha256": sha256(path.weights)},
        "finder_sha256": sha256(path.finder_weights) if Path(path.finder_weights).is_file() else None,
        "precision": str(path.torch_dtype).removeprefix("torch."),
        "seconds": round(seconds, 1),
        "sample": {
            "knees": len(records),
            "labelled": sample.labelled,
            "grade_counts": sample.grade_counts(),
            "warnings": sample.warnings,
        },
        "refused": share_interval(int((~answered).sum()), len(records)),
        "refusals": refusals,
        "training_grade_mix": reference["train_grade_mix"] if reference else None,
        "distance": distance(records, reference),
    }
    profile = None
    if answered.any():
        logits = np.stack([records[i].logits for i in np.flatnonzero(answered)])
        p, g, u = answers(logits, base)
        report["answered"] = unlabelled_figures(p, g, u)
        if sample.labelled:
            y = np.asarray(sample.grades)[answered]
            report["served"] = figures(y, p, g, u, t.bootstrap, args.seed)
            report["served"]["reliability"] = reliability_bins(y, p)
    if sample.labelled and not answered.any():
        report["served"] = None
    cal = calibrate({WHOLE: records, **(other_readings or {})}, sample, base, prior, args)
    if cal is not None:
        labels, p, g, u = cal["oof"]
        on_answered = cal["answered"][cal["index"]]
        cfg: PostprocessConfig = cal["config"]
        report["calibration"] = {
            "knees": cal["knees"],
            "fitted_on": "every labelled knee the model graded (answered, or refused by the finder and graded "
            "whole as a crop, or refused by the knee gate)",
            "cross_fitting": f"{args.folds}-fold stratified, {args.repeats} repeats",
            "methods": cal["cv"],
            "descriptions": {m: site_fit.describe(m) for m in cal["cv"]},
            "rule": cal["rule"],
            "chosen": cal["chosen"],
            "reading": cal["reading"],
            "postprocess": {f: getattr(cfg, f) for f in FITTED_FIELDS},
            "shipped_postprocess": {f: getattr(base, f) for f in FITTED_FIELDS},
        }
        if cal["chosen"] != "shipped" and on_answered.any():
            ya = labels[on_answered]
            report["profile_figures"] = figures(ya, p[on_answered], g[on_answered], u[on_answered], t.bootstrap)
            report["profile_figures"]["reliability"] = reliability_bins(ya, p[on_answered])
            report["profile_figures"]["note"] = "out-of-fold: each knee answered by the profile fitted on the others"
        if cal["chosen"] != "shipped":
            fields = {
                f: list(v) if isinstance(v, tuple) else v for f, v in report["calibration"]["postprocess"].items()
            }
            profile = SiteProfile(
                name=args.site,
                version=next_version(Path(args.out) / args.site),
                model_name=c.model_name,
                model_version=c.model_version,
                postprocess=fields,
                reading=cal["reading"],
                fitted={
                    "method": cal["chosen"],
                    "description": site_fit.describe(cal["chosen"]),
                    "rule": cal["rule"],
                    "knees": cal["knees"],
                },
                sample={"knees": len(records), "grade_counts": sample.grade_counts(), "data": sample.source},
                figures={
                    "cross_fitted": {
                        m: {k: round(v, 4) for k, v in cal["cv"][m].items()} for m in ("shipped", cal["chosen"])
                    },
                },  # fmt: skip
                created=report["date"],
            )
    report["decision"] = decide(report, t)
    report["per_knee"] = per_knee(records, sample, base, sample.source)
    return report, profile


def publish(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` into ``final``, replacing what was there only once the new folder is complete."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.integer | np.floating):
        return x.item()
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(type(x).__name__)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        SiteProfile(name=args.site, version="0", model_name="-", model_version="-", postprocess={})
        sample = read_sample(args.data)
    except (SampleError, ProfileError) as exc:
        log.error("%s", exc)
        return 2
    readings = [r for r in args.readings.split(",") if r]
    if [r for r in readings if r not in READINGS]:
        log.error("--readings: choose among %s, got %s", ",".join(READINGS), args.readings)
        return 2
    for w in sample.warnings:
        log.warning("%s", w)
    t0 = time.perf_counter()
    path = ServedSitePath(args.weights, args.finder, args.precision)
    records = path.run(sample.files, progress=not args.no_progress)
    others: dict[str, list[KneeRecord]] = {}
    # only a joint crop is read another way: a crop answered, or one the knee gate refused when read whole
    crops = any(r.outcome == "crop" or r.refused_by == "gate" for r in records)
    for reading in readings if sample.labelled and crops else []:
        if reading != path.reading:
            log.info("the sample again, its joint crops read %s", reading)
            path.reading = reading
            others[reading] = path.run(sample.files, progress=not args.no_progress)
    path.reading = WHOLE
    report, profile = build_report(sample, records, path, args, time.perf_counter() - t0, others)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{args.site}.", dir=out))
    try:
        write_figures(report, tmp, path.contract.class_names)
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
        (tmp / "report.md").write_text(render_markdown(json.loads((tmp / "report.json").read_text())))
        if profile is not None:
            (tmp / "profile.json").write_text(profile.to_json())
        publish(tmp, out / args.site)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    d = report["decision"]
    log.info(
        "%s: %s (%d knees, %.0f s) -> %s", args.site, d["decision"], len(records), report["seconds"], out / args.site
    )
    if profile is None and report.get("calibration"):
        log.info("no site calibration beat the shipped decoding on held-out knees: no profile written")
    elif profile is not None:
        log.info("site profile %s v%s (%s) -> %s", profile.name, profile.version, profile.fitted["method"],
                 out / args.site / "profile.json")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
