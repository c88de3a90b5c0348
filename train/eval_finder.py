"""Measure the knee-joint finder on annotated films it was not trained on; choose its thresholds on the tune films.

``python -m train.eval_finder --finder runs/finder/finder.pt --choose --out docs/model/finder.json``
``python -m train.eval_finder --render-doc`` writes docs/FILMS.md from the results (`train.films_doc`).
What is measured, and on which films: docs/TRAINING.md (`train.eval_finder`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from model.localize import FinderConfig, Joint, load_finder, plan, save_finder, serving_finder
from train.data import scan
from train.films import Item, load_films, load_nonknee, nonknee_files
from train.films_doc import render
from train.finder_measure import (
    FORMAT_NAMES,
    PRECISIONS,
    choose_threshold,
    film_category,
    film_report,
    measure_variants,
    measured_precision,
    run_finder,
)
from train.finder_views import SEED, hard_variants
from train.served_path import ServedPath, served_outcomes

log = logging.getLogger("train.eval_finder")


def sheet(items: list[Item], found: list[list[Joint]], path: Path, cols: int = 8, cell: int = 120) -> None:
    tiles = []
    for item, js in zip(items, found, strict=True):
        h, w = item.gray.shape
        s = cell / max(h, w)
        im = cv2.cvtColor(cv2.resize(item.gray, (round(w * s), round(h * s))), cv2.COLOR_GRAY2BGR)
        for j in item.joints:
            cx, cy, jw = j.cx, j.cy, j.width
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


def measure(a: argparse.Namespace) -> dict[str, Any]:
    """The figures `main` writes (without ``history``), from its parsed arguments; with ``a.choose`` the
    threshold is chosen on the tune films first and saved into the finder file."""
    net, cfg = load_finder(a.finder)
    precision, dtype = measured_precision(a.precision)
    result: dict[str, Any] = {"finder": a.finder, "precision": precision}
    if a.min_joint_px:
        cfg = replace(cfg, min_joint_px=a.min_joint_px)
    if a.choose:
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
    p.add_argument("--films", default="../shared/data/legfilms")
    p.add_argument("--boxes", default="annotations/legfilms.csv")
    p.add_argument("--koa", default="../shared/data/koa")
    p.add_argument("--nonknee", default="../shared/data/nonknee")
    p.add_argument("--choose", action="store_true", help="choose the score threshold on the tune films, save it")
    p.add_argument(
        "--nonknee-part",
        choices=("all", "heldout"),
        default=None,
        help="which non-knee radiographs to measure (train.films.nonknee_split); by default the held-out "
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
        Path(a.doc).write_text(render(a.out, a.resolution, a.framings))
        return json.loads(Path(a.out).read_text())
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
