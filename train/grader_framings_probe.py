"""Probe: does training the grader on other sites' framings bring a second site's grades closer (#31)?

``python -m train.grader_framings_probe --weights weights/oamen.ckpt runs/framed/best.pt runs/framed/last.pt``
(a few minutes on 2 cores). Each grader's weights go through the served path (finder, crops, mirror) on
every val knee and on the site's labelled knees, and are read the same way for all: the weights alone
(temperature 1, argmax), then, on the site, the ordinal cut-points refitted on 100 random knees and
measured on the others (the site profile's main fit, `train.site_fit`), 20 draws. The knee gate is not
applied (its fallback logits are kept), so a grader not yet calibrated reads like the shipped one.
docs/SITES.md says what was concluded.
"""

from __future__ import annotations

import argparse
import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from model.checkpoint import load_checkpoint
from model.paths import KOA, SITE2
from train.probe_figures import profile_draws, raw_figures, write_result
from train.site_path import ServedSitePath, arrays, records_of, sha256
from train.site_sample import read_sample

log = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", nargs="+", required=True, help="grader checkpoints: the shipped one first")
    p.add_argument("--site-data", default=str(SITE2), help="the site's labelled knees (<grade>/<image>)")
    p.add_argument("--val", default=str(KOA / "val"), help="the training dataset's val split")
    p.add_argument("--knees", type=int, default=100, help="labelled site knees a profile is fitted on")
    p.add_argument("--draws", type=int, default=20)
    p.add_argument("--cache", default="cache/site_study", help="the served path's records, keyed by the weights")
    p.add_argument("--out", default="docs/results/grader_framings.json")
    p.add_argument("--seed", type=int, default=100)
    return p


def main(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    site, val = read_sample(args.site_data), read_sample(args.val)
    cache = Path(args.cache)
    rows = []
    for w in args.weights:
        path = ServedSitePath(w)
        state = load_checkpoint(w)
        val_logits, val_labels, _ = arrays(records_of(path, val.files, cache, "val-all"), val.grades)
        site_logits, site_labels, _ = arrays(records_of(path, site.files, cache, "site2"), site.grades)
        site_raw, p = raw_figures(site_logits, site_labels)
        rows.append({
            "weights": w,
            "sha256": sha256(w),
            "model_version": path.contract.model_version,
            "epoch": state.get("epoch"),
            "val": raw_figures(val_logits, val_labels)[0],
            "site": site_raw,
            f"site_profile_from_{args.knees}": profile_draws(p, site_labels, args.knees, args.draws, args.seed),
        })  # fmt: skip
        log.info("%s: %s", w, json.dumps(rows[-1]))
    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "protocol": "served path (finder, crops, mirror averaged), knee gate not applied; the weights alone "
        f"(temperature 1, argmax); the site profile's cut-points refitted on {args.knees} random site knees and "
        f"measured on the others, {args.draws} draws",
        "site": args.site_data,
        "val": args.val,
        "graders": rows,
    }
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
