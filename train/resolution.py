"""How small may a knee joint be in the source image and still be graded? (the ``resolution_too_low`` floor)

``python -m train.resolution --weights weights/oamen.ckpt --data ../shared/data/koa --out docs/model/resolution.json``

Each val crop is shrunk so that its joint spans ``W`` source pixels (the crop's side becomes
``W * model.localize.CROP_PER_JOINT_WIDTH``, area-averaged as a small film would have recorded
it), then served as usual (the preprocessing enlarges it back to the input size). For each ``W``:
top-1, QWK, agreement with the full-resolution grade, the share the knee gate refuses and the share
flagged uncertain. The floor is the smallest ``W`` whose QWK stays within ``--max-qwk-drop`` of
full resolution and whose gate refusals stay within ``--max-refused`` (both stated in the output).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from model.localize import CROP_PER_JOINT_WIDTH, JOINT_WIDTH_IN_CROP
from train.answers import answer_arrays, load_model, prepare_files, select_split
from train.data import scan
from train.metrics import quadratic_weighted_kappa

log = logging.getLogger("train.resolution")

WIDTHS = (32, 40, 48, 56, 64, 80, 100, 130)


def shrink_to_joint_width(image: np.ndarray, width_px: int) -> np.ndarray:
    """A [0, 1] crop as it would be cut from a film where the joint spans ``width_px`` pixels."""
    side = max(8, round(width_px * CROP_PER_JOINT_WIDTH))
    h, w = image.shape
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def resolution_table(net, contract, samples, widths=WIDTHS, batch_size: int = 32) -> list[dict[str, Any]]:
    labels = np.array([s.grade for s in samples])
    paths = [s.path for s in samples]
    full_width = round(contract.input_size * JOINT_WIDTH_IN_CROP)
    settings = [(f"original ({full_width} px)", None), *((f"{w} px", w) for w in sorted(widths, reverse=True))]
    rows, original = [], None
    for name, width in settings:
        fn = None if width is None else (lambda im, w=width: shrink_to_joint_width(im, w))
        ans = answer_arrays(net, contract, prepare_files(paths, contract, fn), batch_size)
        grades = ans["grades"]
        original = grades if original is None else original
        refused = ans["refused"]
        row = {
            "setting": name,
            "joint_width_px": width or full_width,
            "n": len(labels),
            "accuracy": float((grades == labels).mean()),
            "qwk": quadratic_weighted_kappa(labels, grades, contract.num_classes),
            "agreement_with_original": float((grades == original).mean()),
            "gate_refused": float(refused.mean()) if refused is not None else None,
            "uncertain": float(ans["uncertain"].mean()),
        }
        row["qwk_drop"] = rows[0]["qwk"] - row["qwk"] if rows else 0.0
        rows.append(row)
        log.info("%-16s top-1 %.4f QWK %.4f agree %.3f refused %s", name, row["accuracy"], row["qwk"],
                 row["agreement_with_original"], row["gate_refused"])  # fmt: skip
    return rows


def choose_floor(rows: list[dict[str, Any]], max_qwk_drop: float, max_refused: float) -> int | None:
    """The smallest width from which every larger width also keeps within both limits."""
    floor = None
    for row in sorted(rows[1:], key=lambda r: -r["joint_width_px"]):
        if row["qwk_drop"] > max_qwk_drop or (row["gate_refused"] or 0.0) > max_refused:
            break
        floor = row["joint_width_px"]
    return floor


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default="weights/oamen.ckpt")
    p.add_argument("--data", default="../shared/data/koa")
    p.add_argument("--split", default="val")
    p.add_argument("--max-qwk-drop", type=float, default=0.05)
    p.add_argument("--max-refused", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default="docs/model/resolution.json")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    net, contract, source = load_model(a.weights, None)
    samples = select_split(scan(a.data, contract.num_classes), a.split, "official", 0)
    rows = resolution_table(net, contract, samples, batch_size=a.batch_size)
    result = {
        "source": source,
        "model_version": contract.model_version,
        "split": a.split,
        "crop_per_joint_width": CROP_PER_JOINT_WIDTH,
        "max_qwk_drop": a.max_qwk_drop,
        "max_refused": a.max_refused,
        "floor_px": choose_floor(rows, a.max_qwk_drop, a.max_refused),
        "rows": rows,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    return result


if __name__ == "__main__":
    main()
