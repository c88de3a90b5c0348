"""Measure what the served path (finder, knee gate, grader) answers for knees framed as other sites frame them.

``python -m train.eval_framings --label "finder 1.3.0, grader 1.2.0" --out docs/model/framings_served.json``

For each of `train.framings.FRAMINGS`, val knees (the first ``--per-grade`` of each grade, by name)
are framed, encoded as PNG and sent through `train.served_path.ServedPath` (what the server does):
the share refused and why, the top-1 and QWK of the knees graded, and how often their grade is the
one the unframed knee gets. Then a second site's labelled knees (``--site``, `<grade>/<image>`:
checking only, never fitted on), and the held-out half of the non-knee radiographs. Each run is
kept under its ``--label`` in ``--out``, so that the doc shows before and after (docs/FILMS.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from model.decode import decode_image
from model.localize import load_serving_finder
from model.preprocess import as_float_image
from train.data import scan
from train.films import nonknee_files
from train.finder_measure import measured_precision
from train.framings import FRAMINGS
from train.metrics import quadratic_weighted_kappa
from train.served_path import Served, ServedPath

log = logging.getLogger("train.eval_framings")
REFUSALS = ("not_a_knee", "unsupported_view", "resolution_too_low")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default="weights/oamen.ckpt")
    p.add_argument("--finder", default="weights/finder.pt")
    p.add_argument("--koa", default="../shared/data/koa")
    p.add_argument("--site", default="../shared/data/site2", help="another site's <grade>/<image> knees (checked only)")
    p.add_argument("--nonknee", default="../shared/data/nonknee")
    p.add_argument("--per-grade", type=int, default=40, help="val knees of each grade")
    p.add_argument("--precision", default="served", help="number format of finder and grader (train.eval_finder)")
    p.add_argument("--label", required=True, help="what was measured (finder and grader versions)")
    p.add_argument("--out", default="docs/model/framings_served.json")
    return p


def png(image: np.ndarray) -> bytes:
    """A float [0, 1] image as 8-bit PNG bytes, as a site would send it."""
    ok, buf = cv2.imencode(".png", np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8))
    if not ok:
        raise ValueError(f"could not encode an image of shape {image.shape}")
    return buf.tobytes()


def summarise(answers: list[Served], labels: list[int], reference: list[int] | None) -> dict[str, Any]:
    """Refusal shares by reason; top-1, QWK and MAE of every graded knee against its image's label;
    agreement of an image's first graded knee with ``reference`` (its grade unframed, -1: refused)."""
    n = len(answers)
    refused = {r: sum(a.outcome == r for a in answers) / n for r in REFUSALS}
    y = np.array([lab for a, lab in zip(answers, labels, strict=True) for _ in a.grades], int)
    g = np.array([k for a in answers for k in a.grades], int)
    row: dict[str, Any] = {
        "n": n,
        "refused": sum(refused.values()),
        "refused_by": refused,
        "knees_graded": len(g),
        "accuracy": float((g == y).mean()) if len(g) else None,
        "qwk": quadratic_weighted_kappa(y, g, 5) if len(g) > 1 else None,
        "mae": float(np.abs(g - y).mean()) if len(g) else None,
        "mean_grade_minus_label": float((g - y).mean()) if len(g) else None,
    }
    if reference is not None:
        both = [(a.grades[0], r) for a, r in zip(answers, reference, strict=True) if a.grades and r >= 0]
        row["agreement_with_original"] = float(np.mean([a == r for a, r in both])) if both else None
    return row


def main(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    precision, dtype = measured_precision(args.precision)
    finder = load_serving_finder(args.finder, dtype=dtype)
    if finder is None:
        raise FileNotFoundError(f"no finder at {args.finder}")
    path = ServedPath(args.weights, finder, dtype)
    c = path.contract
    val = [s for s in scan(args.koa, c.num_classes) if s.split == "val"]
    by_grade = [sorted((s for s in val if s.grade == k), key=lambda s: s.path.name) for k in range(c.num_classes)]
    chosen = [s for grade in by_grade for s in grade[: args.per_grade]]
    images = [as_float_image(decode_image(s.path.read_bytes(), max_pixels=c.max_pixels)) for s in chosen]
    labels = [s.grade for s in chosen]
    t0 = time.monotonic()
    rows, reference = [], None
    for framing in FRAMINGS:
        name, what, fn = framing.name, framing.what, framing.apply
        answers = [path(png(fn(im))) for im in tqdm(images, desc=name, leave=False, dynamic_ncols=True)]
        if reference is None:
            reference = [a.grades[0] if a.grades else -1 for a in answers]
        rows.append({"framing": name, "what": what} | summarise(answers, labels, reference))
        log.info("%-15s refused %.3f top-1 %s", name, rows[-1]["refused"], rows[-1]["accuracy"])
    site = {}
    files = sorted(f for f in Path(args.site).glob("[0-4]/*") if f.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if files:
        answers = [path(f.read_bytes()) for f in tqdm(files, desc="site", leave=False, dynamic_ncols=True)]
        site_labels = [int(f.parent.name) for f in files]
        wide = [cv2.imread(str(f), cv2.IMREAD_GRAYSCALE).shape[1] > 2 * 224 for f in files]
        site = {
            "folder": str(args.site),
            "all": summarise(answers, site_labels, None),
            "single_knee_crops": summarise(
                [a for a, w in zip(answers, wide, strict=True) if not w],
                [y for y, w in zip(site_labels, wide, strict=True) if not w],
                None,
            ),
            "both_knee_bands": summarise(
                [a for a, w in zip(answers, wide, strict=True) if w],
                [y for y, w in zip(site_labels, wide, strict=True) if w],
                None,
            ),
        }
    nonknee = {}
    held = nonknee_files(args.nonknee, "heldout") if Path(args.nonknee).is_dir() else []
    if held:
        answers = [path(f.read_bytes()) for f in tqdm(held, desc="non-knee", leave=False, dynamic_ncols=True)]
        nonknee = {"n": len(held), "graded": sum(bool(a.grades) for a in answers)}
    run = {
        "label": args.label,
        "weights": args.weights,
        "grader": {"model_name": c.model_name, "model_version": c.model_version},
        "finder_version": finder[1].version,
        "precision": precision,
        "val_knees": len(chosen),
        "framings": rows,
        "site": site,
        "nonknee_heldout": nonknee,
        "minutes": (time.monotonic() - t0) / 60,
    }
    out = Path(args.out)
    kept = json.loads(out.read_text()) if out.is_file() else {"runs": []}
    kept["runs"] = [r for r in kept["runs"] if r["label"] != args.label] + [run]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(kept, indent=2))
    log.info("wrote %s", out)
    return run


if __name__ == "__main__":
    main(get_args_parser().parse_args())
