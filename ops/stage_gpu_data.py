"""Make a compact, lossy copy of the training data that fits the GPU machine's upload limit.

``python -m ops.stage_gpu_data --data ../shared/data/koa --out gpu_stage --quality 90``

The GPU machine receives at most 64 MiB of working tree per run, code included; the lossless
PNGs are larger than that. JPEG at quality 90 keeps the 224 px knees visually identical and
brings train + val well under the limit (the script prints the size it wrote). Only the GPU run
trains and selects on this copy; the figures we report are always re-measured here, on the
lossless PNGs, with train.evaluate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
from tqdm import tqdm

from train.data import scan


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data/koa"))
    p.add_argument("--out", type=Path, default=Path("gpu_stage"))
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--splits", nargs="+", default=["train", "val"])
    args = p.parse_args(argv)
    samples = [s for s in scan(args.data) if s.split in args.splits]
    total = 0
    for s in tqdm(samples, desc="re-encode"):
        img = cv2.imread(str(s.path), cv2.IMREAD_GRAYSCALE)
        dst = args.out / s.split / str(s.grade) / (s.path.stem + ".jpg")
        dst.parent.mkdir(parents=True, exist_ok=True)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, args.quality])
        if not ok:
            raise RuntimeError(f"could not encode {s.path}")
        dst.write_bytes(buf.tobytes())
        total += len(buf)
    print(f"{len(samples)} images, {total / 2**20:.1f} MiB at JPEG quality {args.quality} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
