"""Figures of a knee-joint finder on annotated films: joints found, the decision per film, the threshold.

Shared by `train.eval_finder` (the shipped finder on the test films) and `train.tune_finder`
(finders compared on the tune films and their hard variants).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from model.localize import FinderConfig, Joint, find_joints, plan
from model.precision import DTYPES, serving_dtype
from train.films import Item, JointBox

THRESHOLDS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6)


PRECISIONS = ("served", *DTYPES)  # "served": what model.precision.serving_dtype picks on this machine


FORMAT_NAMES = {"fp32": "float32", "bf16": "bfloat16"}


def measured_precision(choice: str) -> tuple[str, torch.dtype]:
    """``--precision`` -> (its name in `model.precision.DTYPES`, the dtype); ``served`` is what the server
    would pick on this machine's CPU (``$KOA_PRECISION`` included)."""
    if choice not in PRECISIONS:
        raise ValueError(f"precision {choice!r}: choose one of {', '.join(PRECISIONS)}")
    dtype = serving_dtype(torch.device("cpu")) if choice == "served" else DTYPES[choice]
    return next(k for k, d in DTYPES.items() if d == dtype), dtype


def run_finder(net, cfg: FinderConfig, grays: list[np.ndarray]) -> tuple[list[list[Joint]], float]:
    """Joints per image with ``cfg``, and the median seconds per image at batch 1 (letterbox, ``net`` in
    whatever form and format it is given, peaks: `find_joints`)."""
    out, times = [], []
    for g in grays:
        t0 = time.perf_counter()
        out.extend(find_joints(net, cfg, [g]))
        times.append(time.perf_counter() - t0)
    return out, float(np.median(times)) if times else 0.0


def match(truth: list[JointBox], found: list[Joint]) -> list[dict[str, Any]]:
    """Each annotated joint with the found joint nearest its centre (within half its width)."""
    rows, used = [], set()
    for t in truth:
        cx, cy, w, v = t.cx, t.cy, t.width, t.view
        best, best_d = None, 0.5 * w
        for k, j in enumerate(found):
            d = float(np.hypot(j.centre[0] - cx, j.centre[1] - cy))
            if k not in used and d <= best_d:
                best, best_d = k, d
        row = {"view": "ap" if v == 0 else "other", "width": w, "found": best is not None}
        if best is not None:
            used.add(best)
            j = found[best]
            row.update(centre_error=best_d / w, width_ratio=j.width / w, view_found=j.view)
        rows.append(row)
    return rows


def film_category(item: Item) -> str:
    views = {j.view for j in item.joints}
    return "ap" if 0 in views else "other_only" if views else "no_knee"


def film_report(items: list[Item], found: list[list[Joint]], cfg: FinderConfig) -> dict[str, Any]:
    joints, outcomes = [], []
    for item, js in zip(items, found, strict=True):
        joints += match(item.joints, js)
        p = plan(js, item.gray.shape, cfg)
        outcome = "graded" if p.kind in ("film", "crop") else p.error
        found_boxes = [[round(v, 1) for v in j.box] + [j.view, round(j.score, 3)] for j in js]
        outcomes.append(
            {"file": item.name, "category": film_category(item), "outcome": outcome, "joints": found_boxes,
             "note": item.note}
        )  # fmt: skip
    ap = [r for r in joints if r["view"] == "ap"]
    ok = [r for r in ap if r["found"] and r["centre_error"] < 0.25]
    errs = [r["centre_error"] for r in ap if r["found"]]
    cats: dict[str, dict[str, int]] = {}
    for o in outcomes:
        c = cats.setdefault(o["category"], {})
        c[o["outcome"]] = c.get(o["outcome"], 0) + 1
    ap_films = [o for o in outcomes if o["category"] == "ap"]
    wrongly_graded = [o["file"] for o in outcomes if o["category"] != "ap" and o["outcome"] == "graded"]
    return {
        "films": len(items),
        "ap_joints": len(ap),
        "ap_joints_found": sum(r["found"] for r in ap),
        "ap_joints_centre_within_quarter": len(ok) / len(ap) if ap else None,
        "ap_centre_error_median": float(np.median(errs)) if errs else None,
        "ap_width_ratio_median": float(np.median([r["width_ratio"] for r in ap if r["found"]])) if errs else None,
        "other_joints": sum(r["view"] == "other" for r in joints),
        "other_joints_found_as_other": sum(r["view"] == "other" and r.get("view_found") == "other" for r in joints),
        "outcomes": cats,
        "ap_films_graded": sum(o["outcome"] == "graded" for o in ap_films) / len(ap_films) if ap_films else None,
        "ap_films_answered": sum(o["outcome"] in ("graded", "resolution_too_low") for o in ap_films) / len(ap_films)
        if ap_films
        else None,
        "not_ap_films_graded": wrongly_graded,
        "per_film": outcomes,
    }


def choose_threshold(
    net, cfg: FinderConfig, items: list[Item], negatives: list[Item] | None = None
) -> tuple[FinderConfig, list[dict[str, Any]]]:
    """The threshold with the most right decisions on ``items``: AP films graded or refused as too
    small, other films refused (the median of the tied thresholds).

    With ``negatives`` (images without a knee, e.g. the fit half of the non-knee radiographs), that
    threshold moves only where it costs nothing on ``items``: among the thresholds with as many right
    decisions and as many AP joints within a quarter of their width as it, the one that grades the
    fewest negatives (as a crop or a film), the nearest to it on a tie, then the lower."""
    low = replace(cfg, score_threshold=min(THRESHOLDS))
    found, _ = run_finder(net, low, [i.gray for i in items])
    neg_found = run_finder(net, low, [i.gray for i in negatives])[0] if negatives else None
    rows = []
    for t in THRESHOLDS:
        c = replace(cfg, score_threshold=t)
        kept = [[j for j in js if j.score >= t] for js in found]
        rep = film_report(items, kept, c)
        right = sum(
            (o["category"] == "ap") == (o["outcome"] in ("graded", "resolution_too_low")) for o in rep["per_film"]
        )
        rows.append({"threshold": t, "right": right, "films": len(items),
                     "ap_within_quarter": rep["ap_joints_centre_within_quarter"]})  # fmt: skip
        if neg_found is not None:
            rows[-1]["negatives"] = len(negatives)
            rows[-1]["negatives_graded"] = sum(
                plan([j for j in js if j.score >= t], i.gray.shape, c).kind in ("crop", "film")
                for js, i in zip(neg_found, negatives, strict=True)
            )
    # The middle of the thresholds with the most right decisions: a small tune set often ties over a
    # range, and its middle leaves room on both sides for films that score differently.
    most = max(r["right"] for r in rows)
    tied = [r["threshold"] for r in rows if r["right"] == most]
    t0 = tied[len(tied) // 2]
    if neg_found is not None:
        base = next(r for r in rows if r["threshold"] == t0)
        ap0 = base["ap_within_quarter"] or 0
        free = [r for r in rows if r["right"] >= base["right"] and (r["ap_within_quarter"] or 0) >= ap0]
        t0 = min(free, key=lambda r: (r["negatives_graded"], abs(r["threshold"] - t0), r["threshold"]))["threshold"]
    return replace(cfg, score_threshold=t0), rows


def summary(rep: dict[str, Any]) -> dict[str, Any]:
    ap = rep["ap_joints"]
    ok = round((rep["ap_joints_centre_within_quarter"] or 0) * ap)
    return {"ap_within_quarter": f"{ok}/{ap}", "not_ap_graded": len(rep["not_ap_films_graded"])}


def measure_variants(net, cfg: FinderConfig, sets: dict[str, list[Item]]) -> dict[str, Any]:
    """Per set of films: AP joints within a quarter width, films without an AP knee graded, AP films missed."""
    out: dict[str, Any] = {}
    for name, items in sets.items():
        found, _ = run_finder(net, cfg, [i.gray for i in items])
        rep = film_report(items, found, cfg)
        out[name] = summary(rep)
        out[name]["missed"] = [o["file"] for o in rep["per_film"] if o["category"] == "ap" and o["outcome"] != "graded"]
    return out
