"""Compare knee-joint finders on the tune films and on hard variants of them, never the test films.

``python -m train.tune_finder runs/finder_a/finder.pt runs/finder_b/finder.pt``
The variants and the figures: docs/TRAINING.md (`train.tune_finder`).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from model.localize import FinderConfig, load_finder, plan
from train.films import Item, load_films, load_nonknee
from train.finder_measure import choose_threshold, measure_variants, run_finder
from train.finder_views import hard_variants


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
    p.add_argument("--films", default="../shared/data/legfilms")
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
