"""Site acceptance: a hospital's own knees through the served request path, its calibration, its report.

``python -m train.site_check --site NAME --data FOLDER_OR_CSV`` (``make site-check SITE=... DATA=...``)

Runs every knee of the sample through the server's steps in-process (`train.site_path`: finder,
refusals, knee gate, mirror averaging, in the served number format), then writes ``sites/NAME/``:
``report.md`` and ``report.json`` (per knee answered or refused and why; per site top-1, QWK, MAE,
macro AUC, per-grade recall, ECE, uncertain share and the accuracy of the knees not flagged, each with
a 95% bootstrap interval; the grade mix beside training's; the distance from training; the decision
against ``sites/acceptance.json``), the confusion matrix and reliability plot, and, when a site
calibration beats the shipped decoding on held-out knees (`train.site_fit`), ``profile.json``
(`model.profile`) for ``make serve SITE=NAME``. Without labels it reports what can be known.
Everything is written to a temporary folder first and renamed into place: nothing half-written.
docs/SITES.md is the guide.
"""

from __future__ import annotations

import argparse
import hashlib
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
from model.postprocess import confidences, decode_grades, uncertain
from model.profile import FITTED_FIELDS, ProfileError, SiteProfile, load_profile
from train import site_fit
from train.metrics import reliability_bins
from train.plots import plot_confusion_matrix, plot_reliability
from train.site_path import KneeRecord, ServedSitePath
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
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=4, help="repeats of the cross-fitting (more: slower, steadier)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None, help="default: the server's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


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
    logits: np.ndarray, labels: np.ndarray, base: PostprocessConfig, method: str, prior, folds: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every knee answered by the ``method`` fitted on the other folds: honest 'after' figures."""
    fid = site_fit.stratified_folds(labels, folds, np.random.default_rng(seed))
    p = np.zeros((len(labels), logits.shape[-1]))
    g = np.zeros(len(labels), dtype=np.int64)
    u = np.zeros(len(labels), dtype=bool)
    m = site_fit.METHODS[method]
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
    records: list[KneeRecord], sample: Sample, base: PostprocessConfig, prior, args: argparse.Namespace
) -> dict[str, Any] | None:
    """The site calibrations cross-fitted on the labelled knees the model saw; the chosen one fitted on all."""
    views = 2 if base.flip_tta else 1
    logits, idx = fit_array(records, views)
    if not sample.labelled or len(idx) < MIN_FIT_KNEES:
        return None
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
        logits, labels, base, methods, train_prior=prior, folds=args.folds, repeats=args.repeats, seed=args.seed
    )
    chosen = site_fit.choose(cv)
    cfg = site_fit.fit(site_fit.METHODS[chosen], base, logits, labels, prior)
    p, g, u = out_of_fold(logits, labels, base, chosen, prior, args.folds, args.seed)
    return {
        "knees": len(idx),
        "index": idx,
        "cv": cv,
        "rule": rule_text(),
        "chosen": chosen,
        "config": cfg,
        "oof": (labels, p, g, u),
        "seconds": time.perf_counter() - t0,
    }


def rule_text() -> str:
    """The choice rule, as `train.site_fit.choose` states it."""
    return " ".join(site_fit.choose.__doc__.split("The rule, stated before measuring: ")[1].split())


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
    sample: Sample, records: list[KneeRecord], path: ServedSitePath, args: argparse.Namespace, seconds: float
) -> tuple[dict[str, Any], SiteProfile | None]:
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
    cal = calibrate(records, sample, base, prior, args)
    if cal is not None:
        labels, p, g, u = cal["oof"]
        on_answered = answered[cal["index"]]
        cfg: PostprocessConfig = cal["config"]
        report["calibration"] = {
            "knees": cal["knees"],
            "fitted_on": "every labelled knee the model graded (answered, or refused by the finder and graded "
            "whole as a crop, or refused by the knee gate)",
            "cross_fitting": f"{args.folds}-fold stratified, {args.repeats} repeats",
            "methods": cal["cv"],
            "descriptions": {m: site_fit.METHODS[m].description for m in cal["cv"]},
            "rule": cal["rule"],
            "chosen": cal["chosen"],
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
                fitted={
                    "method": cal["chosen"],
                    "description": site_fit.METHODS[cal["chosen"]].description,
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


def _fmt(v: dict[str, Any] | None, pct: bool = False) -> str:
    if v is None or v.get("value") is None:
        return "n/a"
    f = (lambda x: f"{100 * x:.1f}%") if pct else (lambda x: f"{x:.3f}")
    ci = f" ({f(v['low'])}-{f(v['high'])})" if v.get("low") is not None else ""
    return f(v["value"]) + ci


FIGURE_ROWS = [
    ("top1", "top-1", True), ("qwk", "QWK", False), ("mae", "MAE (grades)", False), ("macro_auc", "macro AUC", False),
    ("ece", "ECE", False), ("uncertain_share", "flagged uncertain", True),
    ("top1_not_flagged", "top-1 of the knees not flagged", True),
    *[(f"recall_kl{k}", f"recall KL{k}", True) for k in range(5)],
]  # fmt: skip


def render_markdown(r: dict[str, Any]) -> str:
    """report.md from report.json."""
    s = r["sample"]
    d = r["decision"]
    lines = [
        f"# Site check: {r['site']}",
        "",
        f"{r['date']}; model {r['model']['name']} v{r['model']['version']} (weights {r['model']['weights_sha256']}, "
        f"finder {r['finder_sha256']}, {r['precision']}); data `{r['data']}`; {s['knees']} knees in {r['seconds']} s.",
        "",
        f"**Decision: {d['decision']}**",
        "",
        *[f"- reason: {x}" for x in d["reasons"]],
        *[f"- warning: {x}" for x in d["warnings"]],
        *[f"- input: {x}" for x in s["warnings"]],
        "",
        "Thresholds (written before the run, `sites/acceptance.json`): "
        + ", ".join(f"{k} {v}" for k, v in d["thresholds"].items()),
        "",
        "## Refusals",
        "",
        f"{_fmt(r['refused'], True)} of the knees were refused by the served path (95% Wilson interval): "
        + (", ".join(f"{k}: {v}" for k, v in r["refusals"].items()) or "none")
        + ".",
        "",
        "## Grade mix",
        "",
        "| | " + " | ".join(f"KL{k}" for k in range(5)) + " |",
        "|---|" + "---|" * 5,
    ]
    if s["grade_counts"]:
        n = sum(s["grade_counts"])
        lines.append("| this site (labels) | " + " | ".join(f"{c / n:.1%}" for c in s["grade_counts"]) + " |")
    if r.get("answered"):
        lines.append(
            "| this site (answers) | " + " | ".join(f"{c:.1%}" for c in r["answered"]["answered_grade_mix"]) + " |"
        )
    if r.get("training_grade_mix"):
        lines.append("| training | " + " | ".join(f"{c:.1%}" for c in r["training_grade_mix"]) + " |")
    dist = r["distance"]
    lines += ["", "## Distance from training", ""]
    if "score" in dist:
        ref = dist["reference"]["gate_scores"]
        lines += [
            f"Distance score **{dist['score']:.2f}**: the site's median knee-gate score less val's median, in units of "
            "val's spread from its median to its 95th percentile. 0 is a site like the val knees; 1 means the typical "
            "knee here sits as far out as the most unusual 5% of val knees. The knee-gate score is the Mahalanobis "
            "distance of the model's features to the training knees', standardised on knees the model never "
            "trained on; the server refuses above its threshold.",
            "",
            f"- median gate score {dist['gate_score_median']:.2f} (val: {ref['p50']:.2f}); "
            f"{dist['above_val_p95']:.1%} of the site's knees score above val's 95th percentile ({ref['p95']:.2f})",
            f"- prepared image brightness {dist['image_mean']:.1f} (val {dist['image_mean_val']:.1f}), contrast (sd) "
            f"{dist['image_sd']:.1f} (val {dist['image_sd_val']:.1f}), on the 0-255 model input",
        ]
    else:
        lines.append(
            "Not reported: no reference for these weights (`make site-study` writes sites/reference.json for the "
            "weights on main)."
        )
    if r.get("served") is None and not s["labelled"]:
        a = r.get("answered")
        lines += [
            "",
            "## Without labels",
            "",
            "**Accuracy cannot be known without the site's grades.** What can be known: the refusals above, the "
            "grade mix answered, and the share flagged uncertain" + (f" ({_fmt(a['uncertain'], True)})." if a else "."),
        ]
    if r.get("served"):
        after = r.get("profile_figures")
        lines += [
            "",
            "## Figures (answered knees, 95% bootstrap intervals)",
            "",
            f"| | shipped ({r['served']['n']} knees) |"
            + (f" site profile, out-of-fold ({after['n']} knees) |" if after else ""),
            "|---|---|" + ("---|" if after else ""),
        ]
        for key, name, pct in FIGURE_ROWS:
            row = f"| {name} | {_fmt(r['served']['figures'][key], pct)} |"
            if after:
                row += f" {_fmt(after['figures'][key], pct)} |"
            lines.append(row)
        lines += ["", "![confusion matrix](confusion.png) ![reliability](reliability.png)"]
        if after:
            lines += ["", "With the site profile (out-of-fold): ![confusion](confusion_profile.png)"]
    cal = r.get("calibration")
    if cal:
        lines += [
            "",
            "## Site calibration",
            "",
            f"Fitted on {cal['knees']} knees: {cal['fitted_on']}. Measured by cross-fitting "
            f"({cal['cross_fitting']}): every figure below is of knees the fit did not see.",
            "",
            "| method | top-1 | QWK | MAE | NLL | score (mean of top-1 and QWK) | gain over shipped, 5th pct |",
            "|---|---|---|---|---|---|---|",
        ]
        for m, v in cal["methods"].items():
            lines.append(
                f"| {m}{' (chosen)' if m == cal['chosen'] else ''} | {v['accuracy']:.1%} | {v['qwk']:.3f} | "
                f"{v['mae']:.3f} | {v['nll']:.3f} | {v['score']:.3f} ± {v['score_sd']:.3f} | "
                f"{v.get('gain_low', 0.0):+.3f} |"
            )
        lines += ["", f"Rule: {cal['rule']}", ""]
        if cal["chosen"] == "shipped":
            lines.append("**No site calibration beats the shipped decoding on held-out knees: the default is kept** "
                         "(no profile.json).")  # fmt: skip
        else:
            lines.append(
                f"**Chosen: {cal['chosen']}**, written to `profile.json`: {cal['postprocess']} "
                f"(shipped: {cal['shipped_postprocess']}). Serve it with `make serve SITE={r['site']}`."
            )
    lines += [
        "",
        "## Per knee",
        "",
        "| file | grade | outcome | answer | confidence | gate score |",
        "|---|---|---|---|---|---|",
    ]
    for k in r["per_knee"]:
        ans = (
            f"KL{k['answered']}" + (" (uncertain)" if k.get("uncertain") else "")
            if "answered" in k
            else k.get("why", "")
        )
        conf = f"{k['confidence']:.2f}" if "confidence" in k else ""
        lines.append(f"| {k['file']} | {k.get('grade', '')} | {k['outcome']} | {ans} | {conf} | {k['gate_score']} |")
    lines += ["", "Figures on Gornale & Patravali's knees, where shown, credit: Gornale, Shivanand; Patravali, Pooja "
              "(2020), \"Digital Knee X-ray Images\", Mendeley Data, v1, doi:10.17632/t9ndx37v5h.1."
              if "site2" in r["data"] else ""]  # fmt: skip
    return "\n".join(lines).rstrip() + "\n"


def write_figures(report: dict[str, Any], folder: Path, names: tuple[str, ...]) -> None:
    for key, suffix in (("served", ""), ("profile_figures", "_profile")):
        r = report.get(key)
        if not r:
            continue
        plot_confusion_matrix(np.array(r["confusion"]), names, folder / f"confusion{suffix}.png",
                              title=f"{report['site']}: {'site profile' if suffix else 'shipped'}")  # fmt: skip
        plot_reliability(r["reliability"], folder / f"reliability{suffix}.png", title=f"{report['site']}")


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
    for w in sample.warnings:
        log.warning("%s", w)
    t0 = time.perf_counter()
    path = ServedSitePath(args.weights, args.finder, args.precision)
    records = path.run(sample.files, progress=not args.no_progress)
    report, profile = build_report(sample, records, path, args, time.perf_counter() - t0)
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
