"""Measure the knee-joint finder on annotated films it was not trained on; choose its thresholds on the tune films.

``python -m train.eval_finder --finder runs/finder/finder.pt --choose --out docs/model/finder.json``

With ``--choose`` the score threshold is chosen on the ``tune`` films (`train.fit_finder.film_split`)
and written into the finder file; the figures are then measured once on the ``test`` films:
- per annotated joint: found or not, centre error as a share of the joint's width, width ratio, view;
- per film, the decision `model.localize.plan` takes: films showing an AP/PA knee should be graded
  (or refused as ``resolution_too_low``), films without a knee and lateral-only films refused;
- the dataset's val crops (should be recognised as crops) and, with ``--nonknee``, real non-knee
  radiographs (the finder alone should find no joint there): all of them, or with
  ``--nonknee-part heldout`` only the half that `train.fit_finder.nonknee_split` keeps out of
  training and of the threshold's choice;
- the finder's time per film on this machine.
All of these are measured with the finder as the server runs it (`model.localize.serving_finder`: traced,
frozen) in the number format of ``--precision`` (default: the one the server picks on this machine,
`model.precision.serving_dtype`), and the served path's grader in that format too; the threshold is
chosen, and the tune films measured, on the float32 eager finder, so the threshold saved in the finder
file does not depend on the machine that chose it.
``--choose --nonknee-fit`` also uses the fit half of the non-knee radiographs to choose the threshold
(`choose_threshold`).
``--sheet JPG`` draws the test films with the annotated (green) and found (red: AP, blue: other) boxes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from model.localize import (
    FinderConfig,
    Joint,
    find_joints,
    load_finder,
    plan,
    save_finder,
    serving_finder,
)
from model.paths import KOA, LEGFILMS, NONKNEE
from model.precision import DTYPES, serving_dtype
from train.data import scan
from train.fit_finder import Item, load_films, load_nonknee, nonknee_files
from train.framings_report import framings_section
from train.served_path import ServedPath, served_outcomes

log = logging.getLogger("train.eval_finder")

THRESHOLDS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6)
BATCH = 16
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


def match(truth: list[tuple[float, float, float, int]], found: list[Joint]) -> list[dict[str, Any]]:
    """Each annotated joint with the found joint nearest its centre (within half its width)."""
    rows, used = [], set()
    for cx, cy, w, v in truth:
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
    views = {v for *_, v in item.joints}
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


def sheet(items: list[Item], found: list[list[Joint]], path: Path, cols: int = 8, cell: int = 120) -> None:
    tiles = []
    for item, js in zip(items, found, strict=True):
        h, w = item.gray.shape
        s = cell / max(h, w)
        im = cv2.cvtColor(cv2.resize(item.gray, (round(w * s), round(h * s))), cv2.COLOR_GRAY2BGR)
        for cx, cy, jw, _ in item.joints:
            cv2.rectangle(im, (round((cx - jw / 2) * s), round((cy - jw / 2) * s)),
                          (round((cx + jw / 2) * s), round((cy + jw / 2) * s)), (0, 200, 0), 2)  # fmt: skip
        for j in js:
            color = (0, 0, 255) if j.view == "ap" else (255, 80, 0)
            x0, y0, x1, y1 = (round(v * s) for v in j.box)
            cv2.rectangle(im, (x0, y0), (x1, y1), color, 1)
        tile = np.full((cell, cell, 3), 255, np.uint8)
        tile[: im.shape[0], : im.shape[1]] = im
        tiles.append(tile)
    while len(tiles) % cols:
        tiles.append(np.full((cell, cell, 3), 255, np.uint8))
    rows = [np.hstack(tiles[i : i + cols]) for i in range(0, len(tiles), cols)]
    cv2.imwrite(str(path), np.vstack(rows), [cv2.IMWRITE_JPEG_QUALITY, 80])


def decisions(net, cfg: FinderConfig, grays: list[np.ndarray]) -> dict[str, Any]:
    """The share of images `plan` grades as a crop, cuts as a film, or refuses (and why)."""
    found = [js for i in range(0, len(grays), BATCH) for js in find_joints(net, cfg, grays[i : i + BATCH])]
    plans = [plan(js, g.shape, cfg) for js, g in zip(found, grays, strict=True)]
    out: dict[str, Any] = {"n": len(plans)}
    for pl in plans:
        key = pl.kind if pl.kind != "refuse" else f"refuse_{pl.error}"
        out[key] = out.get(key, 0) + 1 / len(plans)
    return out


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def history_lines(history: list[dict[str, Any]]) -> list[str]:
    """Earlier reads of the same test films (earlier finders, or this one in another number format): a
    later finder's design may have been led by an earlier one's misses there, which the reader must
    know. An entry without ``precision`` was measured on the float32 eager finder, as all were then."""
    if not history:
        return []
    lines = [
        "",
        "## Earlier reads of the same test films",
        "",
        "Each finder's threshold and settings were fixed on the tune films before its test figures were read.",
        "",
        "| finder, number format | threshold | AP joints within a quarter width | AP films graded | non-knee refused "
        "by the finder alone | non-knee graded by the served path | what followed |",
        "|---|---|---|---|---|---|---|",
    ]
    for h in history:
        lines.append(
            f"| v{h['version']}, {FORMAT_NAMES[h.get('precision', 'fp32')]} ({h['source']}) | {h['score_threshold']} | "
            f"{_pct(h['ap_joints_centre_within_quarter'])} of {h['ap_joints']} | {_pct(h['ap_films_graded'])} | "
            f"{_pct(h['nonknee_refused_by_finder'])} | {_pct(h['nonknee_graded_served'])} | {h['note']} |"
        )
    return lines


def render_doc(result: dict[str, Any], resolution: dict[str, Any], framings: dict[str, Any] | None = None) -> str:
    """docs/FILMS.md from the committed results (``docs/model/finder.json``, ``resolution.json``)."""
    t, cfg = result["test"], result["config"]
    cats = t["outcomes"]
    lines = [
        "# Whole films: finding the knees",
        "",
        "<!-- generated by `python -m train.eval_finder --render-doc` from docs/model/finder.json and",
        "docs/model/resolution.json: do not edit by hand -->",
        "",
        "A film that is not a knee-joint crop is searched for knee joints by the finder (`model.localize`:",
        "the first stages of the ImageNet EfficientNet-Lite0 with a small CenterNet-style head trained",
        "here, `python -m train.fit_finder`); each AP/PA knee found is cut out as the training crops",
        "were cut and graded on its own (docs/API.md, `knees`). Lateral and oblique views, joints too",
        "small to grade and films without a knee are refused, each with its reason.",
        "",
        "Data: the 240 uncropped leg films of `../shared/data/legfilms` (FracAtlas, CC BY 4.0), each knee",
        "joint boxed by eye in `annotations/legfilms.csv`. Films are split by name",
        "(`train.fit_finder.film_split`): the finder trains on `train`, its score threshold is chosen",
        "on `tune`, and every figure below is measured once on the `test` films, which it never saw.",
        "",
        f"Settings (saved with the finder): score threshold {cfg['score_threshold']} (chosen on the tune films),",
        f"an image is a crop already when its AP joint spans at least {cfg['crop_min_share']:.0%} of its width,",
        f"resolution floor {cfg['min_joint_px']} px of joint width (below).",
        "",
        format_line(result),
        "",
        f"## Localisation on the {t['films']} test films",
        "",
        "| figure | value |",
        "|---|---|",
        f"| AP knee joints annotated | {t['ap_joints']} |",
        f"| found (a box within half a joint width) | {t['ap_joints_found']} |",
        f"| centre error under a quarter of the joint width | {_pct(t['ap_joints_centre_within_quarter'])} |",
        f"| median centre error, share of joint width | {t['ap_centre_error_median']:.3f} |",
        f"| median found width / annotated width | {t['ap_width_ratio_median']:.3f} |",
        f"| lateral/oblique joints annotated | {t['other_joints']} |",
        f"| lateral/oblique joints found as such | {t['other_joints_found_as_other']} |",
        f"| finder time per film (median, batch 1, {measured_format(result)}) | "
        f"{1000 * t['finder_seconds_per_film_median']:.0f} ms |",
        "",
        "## What each kind of test film gets",
        "",
        "| film shows | films | " + " | ".join(OUTCOMES) + " |",
        "|---|---|" + "---|" * len(OUTCOMES),
    ]
    for cat, label in CATEGORIES.items():
        row = cats.get(cat, {})
        lines.append(f"| {label} | {sum(row.values())} | " + " | ".join(str(row.get(o, 0)) for o in OUTCOMES) + " |")
    lines += [
        "",
        f"AP films graded: {_pct(t['ap_films_graded'])}; "
        f"graded or refused as too small: {_pct(t['ap_films_answered'])}.",
        f"Films without an AP knee that were graded: {len(t['not_ap_films_graded'])}"
        + (f" ({', '.join(t['not_ap_films_graded'])})." if t["not_ap_films_graded"] else "."),
    ]
    served = result.get("served")
    if served:
        lines += [
            "",
            f"## The whole served path (finder, crops, grader v{served['grader']['model_version']} with its knee gate)",
            "",
            "Decode, find, cut, preprocess, grade, on this machine's 2 cores, batch 1 (`train.eval_finder.ServedPath`,",
            f"the steps of `handler.service` from `model/`), finder and grader in {measured_format(result)}.",
            "",
            "| images | n | graded | refused: not_a_knee | unsupported_view | resolution_too_low | median s | max s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        names = {f"test_films_{k}": f"test films: {v}" for k, v in CATEGORIES.items()}
        names |= {
            "val_crops": "the dataset's val crops (the first, by grade and name)",
            "nonknee": nonknee_label(result, short=True),
        }
        for key, label in names.items():
            if key not in served:
                continue
            r, o = served[key], served[key]["outcomes"]
            lines.append(
                f"| {label} | {r['n']} | {_pct(r['graded_share'])} | {o.get('not_a_knee', 0)} | "
                f"{o.get('unsupported_view', 0)} | {o.get('resolution_too_low', 0)} | {r['seconds_median']:.3f} | "
                f"{r['seconds_max']:.3f} |"
            )
    lines += framings_section(framings or {})
    missed = [o for o in t["per_film"] if o["category"] == "ap" and o["outcome"] != "graded"]
    if missed:
        lines += ["", "AP films not graded, with what the annotator noted:", ""]
        lines += [f"- {o['file']}: {o['outcome']} ({o.get('note') or 'no note'})" for o in missed]
    lines += [
        "",
        "Beyond the films: of the dataset's val crops the finder takes "
        f"{_pct(result['val_crops'].get('crop'))} as crops (graded as before); of the "
        f"{result.get('nonknee', {}).get('n', 0)} {nonknee_label(result)} it refuses "
        f"{_pct(_refused(result.get('nonknee', {})))} on its own.",
    ]
    hard = result.get("tune_hard")
    if hard:
        lines += [
            "",
            "## The kinds of film it found hard, on the tune films",
            "",
            "The tune films hold almost no knees with metal, cut by the film's edge or washed out, so each",
            "tune film is also drawn that way (`python -m train.tune_finder`, fixed seed): synthetic plates,",
            "screws and staples over the bone (two draws per film), the film cut so an AP joint sits 10-40% of",
            "its width inside the top, bottom or side edge, and washed out. The finder trains on such views of",
            "its train films (`train.fit_finder.Hard`); the metal and washed-out variants here come from the",
            "same generators, so they measure the kind, not real hardware.",
            "",
            "| tune films | AP joints within a quarter width | films without an AP knee graded |",
            "|---|---|---|",
        ]
        labels = {"tune": "as they are", "metal": "with synthetic metal", "edge": "a joint at the film's edge",
                  "faint": "washed out"}  # fmt: skip
        for key, label in labels.items():
            if key in hard:
                lines.append(f"| {label} | {hard[key]['ap_within_quarter']} | {hard[key]['not_ap_graded']} |")
    if result.get("test_reads_note"):
        lines += ["", f"How the test films were read for this finder: {result['test_reads_note']}"]
    lines += history_lines(result.get("history", []))
    lines += [
        "",
        "![The test films: annotated joints green, found AP joints red, lateral/oblique blue]"
        "(model/finder_test_films.jpg)",
        "",
        f"## The resolution floor (grader v{resolution.get('model_version', '?')})",
        "",
        "How small may a joint be? Each val crop shrunk so that its joint spans W pixels, then served as",
        "usual (`python -m train.resolution`). The floor is the smallest W whose QWK stays within",
        f"{resolution['max_qwk_drop']} of full resolution and whose knee-gate refusals stay within",
        f"{resolution['max_refused']:.0%}: **{resolution['floor_px']} px**.",
        "",
        "| joint width | top-1 | QWK | QWK drop | same grade as full resolution | gate refused | uncertain |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in resolution["rows"]:
        lines.append(
            f"| {r['setting']} | {r['accuracy']:.3f} | {r['qwk']:.3f} | {r['qwk_drop']:.3f} | "
            f"{r['agreement_with_original']:.3f} | {_pct(r['gate_refused'])} | {_pct(r['uncertain'])} |"
        )
    lines += [
        "",
        "## Limits",
        "",
        "- Trained on 134 films of one public trauma dataset (mostly young patients); knees of other",
        "  hospitals' films, children with open growth plates and knees with hardware are few.",
        "- Laterality comes from the DICOM header (for a film with one graded knee), else from a burned-in",
        "  R/L marker read by `weights/markers.pt` ([API.md](API.md)); without either it is null. `side`",
        "  says where the knee is in the image.",
        "- A knee whose joint is cut by the film's edge is cut out with black beyond the edge.",
        "",
    ]
    return "\n".join(lines)


def measured_format(result: dict[str, Any]) -> str:
    """The number format of the measured finder: results from before ``precision`` were float32 eager."""
    return FORMAT_NAMES[result["precision"]] if "precision" in result else "float32 eager"


def format_line(result: dict[str, Any]) -> str:
    """Which form and number format of the finder the figures below are of."""
    if "precision" not in result:
        return "Number format: every figure was measured on the float32 eager finder."
    return (
        f"Number format: the test films, val crops and non-knee radiographs were measured with the finder as "
        f"the server runs it (traced and frozen), in {measured_format(result)} (`--precision`, `model.precision`), "
        "and the served path's grader in the same format; the threshold was chosen, and the tune films "
        "measured, on the float32 eager finder."
    )


def nonknee_label(result: dict[str, Any], short: bool = False) -> str:
    """Which non-knee radiographs the figures are on, and whether the finder saw them."""
    heldout = result.get("nonknee", {}).get("part") == "heldout"
    if short:
        return "non-knee radiographs (hand, hip, shoulder)" + (": the held-out half only" if heldout else "")
    if heldout:
        return (
            "held-out non-knee radiographs (hand, hip, shoulder: the half of `../shared/data/nonknee` that "
            "`train.fit_finder.nonknee_split` keeps out; never used to train or tune the finder, while the "
            "other half was trained on as films without a knee and helped choose the threshold)"
        )
    return "non-knee radiographs (hand, hip, shoulder; never used to train or tune the finder)"


def nonknee_figures(net, cfg: FinderConfig, files: list[Path], weights: str | None) -> dict[str, Any]:
    """On ``files``: the finder's own decisions (shares of crop, film, refuse) and, with the grader's
    ``weights``, the whole served path's outcomes."""
    grays = [cv2.imread(str(f), cv2.IMREAD_GRAYSCALE) for f in files]
    plans = [plan(js, g.shape, cfg) for js, g in zip(run_finder(net, cfg, grays)[0], grays, strict=True)]
    shares = {k: sum(pl.kind == k for pl in plans) / len(plans) for k in ("crop", "film", "refuse")}
    out: dict[str, Any] = {"finder": {"n": len(plans), **shares}}
    if weights:
        out["served"] = served_outcomes(ServedPath(weights, (net, cfg)), files)
    return out


def _refused(shares: dict[str, Any]) -> float | None:
    return sum(v for k, v in shares.items() if k.startswith("refuse")) if shares else None


OUTCOMES = ("graded", "resolution_too_low", "unsupported_view", "not_a_knee")
CATEGORIES = {"ap": "an AP/PA knee", "other_only": "only lateral/oblique knees", "no_knee": "no knee joint"}


def measure(a: argparse.Namespace) -> dict[str, Any]:
    """The figures `main` writes (without ``history``), from its parsed arguments; with ``a.choose`` the
    threshold is chosen on the tune films first and saved into the finder file."""
    net, cfg = load_finder(a.finder)
    precision, dtype = measured_precision(a.precision)
    result: dict[str, Any] = {"finder": a.finder, "precision": precision}
    if a.min_joint_px:
        cfg = replace(cfg, min_joint_px=a.min_joint_px)
    if a.choose:
        from train.tune_finder import SEED, hard_variants, measure_variants

        tune = load_films(a.films, a.boxes, "tune")
        negatives = load_nonknee(a.nonknee, "fit") if a.nonknee_fit else None
        cfg, result["tune"] = choose_threshold(net, cfg, tune, negatives)
        result["tune_hard"] = {"seed": SEED, **measure_variants(net, cfg, {"tune": tune, **hard_variants(tune)})}
        state = torch.load(a.finder, map_location="cpu", weights_only=True)
        changed = FinderConfig.from_dict(json.loads(state["config"])) != cfg
        if changed:  # an unchanged finder file keeps its bytes (torch.save would not)
            save_finder(a.finder, net, cfg, **{k: v for k, v in state.items() if k not in ("model", "config")})
        log.info("chose score threshold %.2f on the tune films; %s %s", cfg.score_threshold,
                 "saved into" if changed else "already in", a.finder)  # fmt: skip
    result["config"] = cfg.__dict__
    log.info("measuring the finder as the server runs it, in %s", FORMAT_NAMES[precision])
    net = serving_finder(net, cfg.input_size, dtype=dtype)
    test = load_films(a.films, a.boxes, "test")
    found, per_film_s = run_finder(net, cfg, [i.gray for i in test])
    result["test"] = film_report(test, found, cfg)
    result["test"]["finder_seconds_per_film_median"] = per_film_s
    if a.sheet:
        sheet(test, found, Path(a.sheet))
    val = [s for s in scan(a.koa, 5) if s.split == "val"]
    grays = [cv2.imread(str(s.path), cv2.IMREAD_GRAYSCALE) for s in val]
    plans = [plan(js, g.shape, cfg) for js, g in zip(run_finder(net, cfg, grays)[0], grays, strict=True)]
    result["val_crops"] = {
        "n": len(plans),
        **{k: sum(pl.kind == k for pl in plans) / len(plans) for k in ("crop", "film", "refuse")},
    }
    if a.nonknee and Path(a.nonknee).is_dir():
        files_nonknee = nonknee_files(a.nonknee, None if a.nonknee_part == "all" else a.nonknee_part)
        grays = [cv2.imread(str(f), cv2.IMREAD_GRAYSCALE) for f in files_nonknee]
        plans = [plan(js, g.shape, cfg) for js, g in zip(run_finder(net, cfg, grays)[0], grays, strict=True)]
        result["nonknee"] = {
            "n": len(plans),
            **{k: sum(pl.kind == k for pl in plans) / len(plans) for k in ("crop", "film", "refuse")},
        }
        if a.nonknee_part != "all":
            result["nonknee"]["part"] = a.nonknee_part
    if a.weights:
        grader_sha = hashlib.sha256(Path(a.weights).read_bytes()).hexdigest()  # the file may be replaced later
        served = ServedPath(a.weights, (net, cfg), dtype)
        by_cat: dict[str, list[Path]] = {}
        for item in test:
            by_cat.setdefault(film_category(item), []).append(Path(a.films) / item.name)
        result["served"] = {f"test_films_{c}": served_outcomes(served, fs) for c, fs in sorted(by_cat.items())}
        result["served"]["val_crops"] = served_outcomes(served, [s.path for s in val[: a.served_val]])
        if a.nonknee and Path(a.nonknee).is_dir():
            result["served"]["nonknee"] = served_outcomes(served, files_nonknee)
        result["served"]["grader"] = {
            "weights": a.weights,
            "sha256": grader_sha,
            "model_version": served.contract.model_version,
        }
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--finder", default="weights/finder.pt")
    p.add_argument("--films", default=str(LEGFILMS))
    p.add_argument("--boxes", default="annotations/legfilms.csv")
    p.add_argument("--koa", default=str(KOA))
    p.add_argument("--nonknee", default=str(NONKNEE))
    p.add_argument("--choose", action="store_true", help="choose the score threshold on the tune films, save it")
    p.add_argument(
        "--nonknee-part",
        choices=("all", "heldout"),
        default=None,
        help="which non-knee radiographs to measure (train.fit_finder.nonknee_split); by default the held-out "
        "half for a finder trained on the fit half, else all",
    )
    p.add_argument(
        "--nonknee-fit",
        action="store_true",
        help="with --choose: the fit half of --nonknee helps choose the threshold (choose_threshold's negatives); "
        "the default for a finder trained on the fit half",
    )
    p.add_argument("--min-joint-px", type=int, default=None, help="resolution floor (from train.resolution)")
    p.add_argument("--sheet", default=None, help="contact sheet of the test films (.jpg)")
    p.add_argument("--weights", default="weights/oamen.ckpt", help="the grader, for the whole served path")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="served",
        help="number format of the measured finder (and of the served path's grader): served (default) is what "
        "the server picks on this machine (model.precision.serving_dtype, $KOA_PRECISION)",
    )
    p.add_argument("--served-val", type=int, default=200, help="val crops sent through the whole served path")
    p.add_argument("--out", default="docs/model/finder.json")
    p.add_argument("--resolution", default="docs/model/resolution.json", help="train.resolution's result")
    p.add_argument("--doc", default="docs/FILMS.md")
    p.add_argument("--framings", default="docs/model/framings_served.json", help="train.eval_framings's result")
    p.add_argument("--render-doc", action="store_true", help="only write --doc from --out and --resolution")
    a = p.parse_args(argv)
    if a.render_doc:
        result = json.loads(Path(a.out).read_text())
        framings = json.loads(Path(a.framings).read_text()) if Path(a.framings).is_file() else None
        Path(a.doc).write_text(render_doc(result, json.loads(Path(a.resolution).read_text()), framings))
        return result
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    trained = torch.load(a.finder, map_location="cpu", weights_only=True).get("trained") or "{}"
    if json.loads(trained).get("nonknee"):  # trained on the fit half: only the held-out half measures it
        if a.nonknee_part == "all":
            p.error("this finder trained on the fit half of the non-knee radiographs: use --nonknee-part heldout")
        a.nonknee_part, a.nonknee_fit = "heldout", True
    a.nonknee_part = a.nonknee_part or "all"
    with torch.no_grad():  # nothing in it trains; the caller's grad mode comes back (tests call main)
        result = measure(a)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    if Path(a.out).is_file():  # earlier reads of the same test films stay on record
        result["history"] = json.loads(Path(a.out).read_text()).get("history", [])  # (a new note is for a new run)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    t = result["test"]
    log.info("test films %d: AP joints within a quarter width %.3f, AP films graded %.3f, answered %.3f, "
             "non-AP films graded %d; val crops as crops %.3f", t["films"], t["ap_joints_centre_within_quarter"] or 0,
             t["ap_films_graded"] or 0, t["ap_films_answered"] or 0, len(t["not_ap_films_graded"]),
             result["val_crops"]["crop"])  # fmt: skip
    return result


if __name__ == "__main__":
    main()
