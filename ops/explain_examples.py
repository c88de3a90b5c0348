"""The example pictures of docs/EXPLAIN.md, made by the served request path (`handler.service.Predictor`).

``python -m ops.explain_examples [--data ../shared/data/koa] [--out docs/explain] [--method layercam]``

One val knee per KL grade (the first of `ops.explain_metrics.sample_knees`' seeded sample whose answer
agrees with its label), explained with the default method, overlay as the server returns it; one knee
under every method side by side; and the leg-film fixtures with both knees and with one knee
(tests/fixtures/films, FracAtlas, CC BY 4.0), the film's own overlay scaled to 640 px wide. Small JPEGs,
committed.
"""

from __future__ import annotations

import argparse
import base64
import logging
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from handler.explain import DEFAULT_METHOD, METHODS
from handler.service import Predictor
from model.checkpoint import model_from_checkpoint
from model.localize import load_serving_finder
from model.paths import KOA
from ops.explain_metrics import sample_knees
from ops.results import ROOT

log = logging.getLogger(__name__)
FILMS = ("bilateral_IMG0002119.jpg", "ap_IMG0000653.jpg")
FILM_WIDTH = 640


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=KOA)
    p.add_argument("--checkpoint", type=Path, default=ROOT / "weights" / "oamen.ckpt")
    p.add_argument("--finder", type=Path, default=ROOT / "weights" / "finder.pt")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "explain")
    return p


def overlay(body: dict) -> np.ndarray:
    png = base64.b64decode(body["explanation"]["overlay_png"])
    return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)


def label(img: np.ndarray, text: str) -> np.ndarray:
    out = img.copy()
    cv2.putText(out, text, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def save(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 85]):
        raise RuntimeError(f"could not write {path}")
    log.info("wrote %s", path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    net, contract = model_from_checkpoint(args.checkpoint)
    finder = load_serving_finder(args.finder)
    pred = Predictor(net, net, contract, torch.device("cpu"), finder)
    shown: set[int] = set()
    tiles = []
    for path, grade in sample_knees(args.data, "val", 100, args.seed, contract.num_classes):
        if grade in shown:
            continue
        [(status, body)] = pred.handle([{"body": path.read_bytes(), "explain": b"true", "method": args.method}], [{}])
        if status != 200 or body["kl_grade"] != grade:
            continue
        shown.add(grade)
        tiles.append((grade, label(overlay(body), f"KL{grade} p={body['confidence']:.2f}")))
        if len(shown) == contract.num_classes:
            break
    strip = np.hstack([t for _, t in sorted(tiles, key=lambda t: t[0])])
    save(args.out / f"grades_{args.method}.jpg", strip)
    path = sample_knees(args.data, "val", 100, args.seed, contract.num_classes)[2][0]  # a KL2 knee
    per_method = []
    for method in METHODS:
        [(status, body)] = pred.handle([{"body": path.read_bytes(), "explain": b"true", "method": method}], [{}])
        if status == 200:
            per_method.append(label(overlay(body), method))
    save(args.out / "methods.jpg", np.hstack(per_method))
    for name in FILMS:
        film = (ROOT / "tests" / "fixtures" / "films" / name).read_bytes()
        [(status, body)] = pred.handle([{"body": film, "explain": b"true", "method": args.method}], [{}])
        if status != 200:
            log.warning("%s was not graded: %s", name, body)
            continue
        img = overlay(body)
        h, w = img.shape[:2]
        save(
            args.out / f"film_{name.split('_')[0]}.jpg",
            cv2.resize(img, (FILM_WIDTH, round(h * FILM_WIDTH / w)), interpolation=cv2.INTER_AREA),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
