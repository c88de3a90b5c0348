"""report.md and the figures of a site check (`train.site_check`), from its report.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from model.localize import WHOLE
from train.plots import plot_confusion_matrix, plot_reliability

__all__ = ["render_markdown", "write_figures"]


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
            "| method | top-1 | QWK | MAE | NLL | ECE | score (mean of top-1 and QWK) | gain over shipped, 5th pct |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for m, v in cal["methods"].items():
            lines.append(
                f"| {m}{' (chosen)' if m == cal['chosen'] else ''} | {v['accuracy']:.1%} | {v['qwk']:.3f} | "
                f"{v['mae']:.3f} | {v['nll']:.3f} | {v.get('ece', float('nan')):.3f} | {v['score']:.3f} ± "
                f"{v['score_sd']:.3f} | {v.get('gain_low', 0.0):+.3f} |"
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
            if cal.get("reading", WHOLE) != WHOLE:
                lines += ["", f"The profile reads this site's single-knee crops `{cal['reading']}`: each is cut "
                          "around the joint the finder sees, as a film's knee is, instead of being graded whole "
                          "(docs/SITES.md, reading a site's crops). The refusals and the shipped figures above are "
                          "of the shipped reading; the profile's figures are of its own."]  # fmt: skip
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
