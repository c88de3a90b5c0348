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
