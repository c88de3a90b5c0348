"""Views for annotating knee joints in whole films by eye (the boxes in ``annotations/legfilms.csv``).

``python -m train.annotate grid FILM [--region x0 y0 x1 y1] --out PNG``: a labelled pixel grid;
``python -m train.annotate check FILM... --out DIR``: the annotated boxes drawn. The box convention:
docs/TRAINING.md (`train.annotate`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from train.films import read_boxes


def enlarged(gray: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """A gray image scaled so that its longer side is ``size``, in colour (to draw on), and the scale."""
    scale = size / max(gray.shape)
    shape = (round(gray.shape[1] * scale), round(gray.shape[0] * scale))
    big = cv2.resize(gray, shape, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    return cv2.cvtColor(big, cv2.COLOR_GRAY2BGR), scale


def grid_view(gray: np.ndarray, region: tuple[int, int, int, int] | None, size: int = 900) -> np.ndarray:
    h, w = gray.shape
    x0, y0, x1, y1 = region or (0, 0, w, h)
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    rgb, scale = enlarged(gray[y0:y1, x0:x1], size)
    span = max(x1 - x0, y1 - y0)
    step = next(s for s in (5, 10, 20, 25, 50, 100, 200, 250, 500) if span / s <= 16)
    pad = 40
    canvas = np.full((rgb.shape[0] + pad, rgb.shape[1] + pad, 3), 255, np.uint8)
    canvas[pad:, pad:] = rgb
    for gx in range((x0 // step + 1) * step, x1, step):
        px = pad + round((gx - x0) * scale)
        cv2.line(canvas, (px, pad), (px, canvas.shape[0]), (0, 200, 255), 1)
        cv2.putText(canvas, str(gx), (px - 12, 25), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 200), 1)
    for gy in range((y0 // step + 1) * step, y1, step):
        py = pad + round((gy - y0) * scale)
        cv2.line(canvas, (pad, py), (canvas.shape[1], py), (0, 200, 255), 1)
        cv2.putText(canvas, str(gy), (0, py + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 200), 1)
    return canvas


def draw_boxes(gray: np.ndarray, rows: list[dict], size: int = 700) -> np.ndarray:
    rgb, scale = enlarged(gray, size)
    for r in rows:
        if r.get("box"):
            x0, y0, x1, y1 = (round(v * scale) for v in r["box"])
            cv2.rectangle(rgb, (x0, y0), (x1, y1), (0, 255, 0), 2)
            cv2.drawMarker(rgb, ((x0 + x1) // 2, (y0 + y1) // 2), (0, 0, 255), cv2.MARKER_CROSS, 12, 2)
            cv2.putText(rgb, r["view"], (x0, max(12, y0 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 255, 0), 1)
        else:
            cv2.putText(rgb, r["view"], (10, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 255), 2)
    return rgb


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("grid", help="a film or region with a labelled pixel grid")
    g.add_argument("film")
    g.add_argument("--region", nargs=4, type=int, metavar=("X0", "Y0", "X1", "Y1"))
    g.add_argument("--size", type=int, default=900)
    g.add_argument("--out", required=True)
    c = sub.add_parser("check", help="films with their annotated boxes drawn")
    c.add_argument("films", nargs="+")
    c.add_argument("--csv", default="annotations/legfilms.csv")
    c.add_argument("--out", required=True, help="folder")
    a = p.parse_args(argv)
    if a.cmd == "grid":
        gray = cv2.imread(a.film, cv2.IMREAD_GRAYSCALE)
        if gray is None:
            raise SystemExit(f"cannot read {a.film}")
        cv2.imwrite(a.out, grid_view(gray, tuple(a.region) if a.region else None, a.size))
        print(f"{a.out}: {a.film} {gray.shape[1]}x{gray.shape[0]}")
    else:
        boxes = read_boxes(a.csv)
        Path(a.out).mkdir(parents=True, exist_ok=True)
        for film in a.films:
            gray = cv2.imread(film, cv2.IMREAD_GRAYSCALE)
            name = Path(film).name
            out = Path(a.out) / (Path(film).stem + "_check.png")
            cv2.imwrite(str(out), draw_boxes(gray, boxes.get(name, [])))
            print(out)


if __name__ == "__main__":
    main()
