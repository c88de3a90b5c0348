"""Compare knee-joint finders on the tune films and on hard variants of them, never the test films.

``python -m train.tune_finder runs/finder_a/finder.pt runs/finder_b/finder.pt``

The 38 tune films (`train.fit_finder.film_split`) are nearly all easy: one small infant and no
hardware. So each finder is also measured on variants of the same tune films drawn with a fixed seed
as the kinds the finder found hard (#21): synthetic metal over the bone near a joint (and anywhere on
a film without one), the film cut so a joint sits at its top, bottom or side edge, and the film
washed out. Every finder is measured at the threshold `train.eval_finder.choose_threshold` picks for
it on the real tune films. Figures: AP joints whose centre is within a quarter of their width, and
films without an AP knee that would be graded.

With ``--nonknee DIR`` each finder is also measured on the fit half of the non-knee radiographs
(`train.fit_finder.nonknee_split`: the half that may be trained on and used to choose the threshold;
never the held-out half), and that half joins the threshold's choice (`choose_threshold`'s
negatives). ``--saved-threshold`` measures each finder at the threshold saved in its file instead.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from model.localize import FinderConfig, load_finder, plan
from model.paths import LEGFILMS
from train.eval_finder import choose_threshold, film_report, run_finder
from train.fit_finder import Item, fade, load_films, load_nonknee, paste_metal

SEED = 20261130


def metal_variant(item: Item, rng: np.random.Generator) -> Item:
    g = item.gray.copy()
    paste_metal(g, item.joints, rng)
    return Item(item.name + "+metal", g, item.joints, item.kind, item.note)


def faint_variant(item: Item, rng: np.random.Generator) -> Item:
    return Item(item.name + "+faint", fade(item.gray, rng), item.joints, item.kind, item.note)


def edge_variants(item: Item, rng: np.random.Generator) -> list[Item]:
    """For each AP joint, the film cut so that the joint's centre is 10-40% of its width inside the
    top, bottom or side edge (the other joints kept where their centres stay inside)."""
    out = []
    h, w = item.gray.shape
    for k, (cx, cy, jw, v) in enumerate(item.joints):
        if v != 0:
            continue
        d = jw * rng.uniform(0.1, 0.4)
        edge = ("top", "bottom", "side")[k % 3 if len(item.joints) > 1 else int(rng.integers(3))]
        x0, y0, x1, y1 = 0, 0, w, h
        if edge == "top":
            y0 = max(0, round(cy - d))
        elif edge == "bottom":
            y1 = min(h, round(cy + d))
        elif cx < w / 2:
            x0 = max(0, round(cx - d))
        else:
            x1 = min(w, round(cx + d))
        joints = [(a - x0, b - y0, c, e) for a, b, c, e in item.joints if x0 <= a < x1 and y0 <= b < y1]
        out.append(Item(f"{item.name}+edge_{edge}", item.gray[y0:y1, x0:x1].copy(), joints, item.kind, item.note))
    return out


def knee_free_windows(item: Item, rng: np.random.Generator, n: int = 4) -> list[Item]:
    """Up to ``n`` windows of the film (30-80% of each side) that no joint box touches: radiographs
    with bone but no knee, half of them with synthetic metal (a proxy for other body parts' films,
    which the finder must refuse; the held-out half of the non-knee radiographs stays unseen)."""
    h, w = item.gray.shape
    out = []
    for k in range(n * 10):
        ww, wh = round(w * rng.uniform(0.3, 0.8)), round(h * rng.uniform(0.3, 0.8))
        x0, y0 = int(rng.integers(0, w - ww + 1)), int(rng.integers(0, h - wh + 1))
        near = [
            x0 < cx + jw and cx - jw < x0 + ww and y0 < cy + jw and cy - jw < y0 + wh for cx, cy, jw, _ in item.joints
        ]
        if any(near):  # a joint, with a joint's width around it, reaches into the window
            continue
        g = item.gray[y0 : y0 + wh, x0 : x0 + ww].copy()
        if len(out) % 2:
            paste_metal(g, [], rng)
        out.append(Item(f"{item.name}+part{k}", g, [], item.kind, item.note))
        if len(out) == n:
            break
    return out


def summary(rep: dict[str, Any]) -> dict[str, Any]:
    ap = rep["ap_joints"]
    ok = round((rep["ap_joints_centre_within_quarter"] or 0) * ap)
    return {"ap_within_quarter": f"{ok}/{ap}", "not_ap_graded": len(rep["not_ap_films_graded"])}


def hard_variants(tune: list[Item], seed: int = SEED) -> dict[str, list[Item]]:
    rng = np.random.default_rng(seed)
    return {
        "metal": [metal_variant(i, rng) for i in tune for _ in range(2)],
        "edge": [e for i in tune for e in edge_variants(i, rng)],
        "faint": [faint_variant(i, rng) for i in tune],
        "knee_free": [p for i in tune for p in knee_free_windows(i, rng)],
    }


def measure_variants(net, cfg: FinderConfig, sets: dict[str, list[Item]]) -> dict[str, Any]:
    """Per set of films: AP joints within a quarter width, films without an AP knee graded, AP films missed."""
    out: dict[str, Any] = {}
    for name, items in sets.items():
        found, _ = run_finder(net, cfg, [i.gray for i in items])
        rep = film_report(items, found, cfg)
        out[name] = summary(rep)
        out[name]["missed"] = [o["file"] for o in rep["per_film"] if o["category"] == "ap" and o["outcome"] != "graded"]
    return out


def refusals(net, cfg: FinderConfig, items: list[Item]) -> dict[str, Any]:
    """On images without a knee: how many the finder alone refuses, and which it would grade."""
    found, _ = run_finder(net, cfg, [i.gray for i in items])
    kinds = [plan(js, i.gray.shape, cfg).kind for js, i in zip(found, items, strict=True)]
    graded = [i.name for i, k in zip(items, kinds, strict=True) if k in ("crop", "film")]
    return {"n": len(items), "refused": sum(k == "refuse" for k in kinds) / len(items), "graded": graded}


def measure(
    path: str,
    tune: list[Item],
    variants: dict[str, list[Item]],
    negatives: list[Item] | None = None,
    saved: bool = False,
) -> dict[str, Any]:
    net, cfg = load_finder(path)
    if not saved:
        cfg, _ = choose_threshold(net, cfg, tune, negatives)
    out = {"finder": path, "threshold": cfg.score_threshold, **measure_variants(net, cfg, {"tune": tune, **variants})}
    if negatives:
        out["nonknee_fit"] = refusals(net, cfg, negatives)
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("finders", nargs="+")
    p.add_argument("--films", default=str(LEGFILMS))
    p.add_argument("--boxes", default="annotations/legfilms.csv")
    p.add_argument("--nonknee", default=None, help="non-knee radiographs: their fit half is measured and helps choose")
    p.add_argument("--saved-threshold", action="store_true", help="measure at each finder's saved threshold")
    a = p.parse_args(argv)
    tune = load_films(a.films, a.boxes, "tune")
    variants = hard_variants(tune)
    negatives = load_nonknee(a.nonknee, "fit") if a.nonknee else None
    rows = [measure(f, tune, variants, negatives, a.saved_threshold) for f in a.finders]
    print(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
