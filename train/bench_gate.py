"""What the knee gate (and mirror averaging) cost: the handler's request path with and without, side by side.

``python -m train.bench_gate [--model build/oamen.pt] [--rounds 8] [--json docs/results/bench_gate.json]``
What is timed, and how: docs/TRAINING.md (`train.bench_gate`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import load_torchscript
from model.decode import decode_image
from model.localize import find_joints, load_serving_finder
from model.precision import served_models
from model.preprocess import prepare, to_model_input

ROOT = Path(__file__).resolve().parents[1]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "build" / "oamen.pt")
    p.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "data" / "koa" / "val" / "2")
    p.add_argument("--finder", type=Path, default=ROOT / "weights" / "finder.pt", help="'' to leave it out")
    p.add_argument("--batch", type=int, default=8, help="the shipped batch size (config.properties)")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--batches-per-round", type=int, default=6)
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "results" / "bench_gate.json")
    return p


def request_path(net, contract, blobs: list[bytes], gated: bool, flip: bool = False, finder=None) -> None:
    grays = [decode_image(b) for b in blobs]
    if finder is not None:
        find_joints(*finder, grays)
    arrays = [to_model_input(prepare(g, contract), contract) for g in grays]
    x = torch.from_numpy(np.stack(arrays)).contiguous(memory_format=torch.channels_last)
    run = net.forward_with_gate if gated else net.forward
    if flip:  # mirror averaging: the images and their mirrors in one pass, as handler.service runs it
        x = torch.cat([x, torch.flip(x, dims=[3])]).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        run(x)


def main(args: argparse.Namespace) -> dict:
    scripted, contract = load_torchscript(args.model)
    if not hasattr(scripted, "forward_with_gate"):
        raise SystemExit(f"{args.model} has no knee gate (export an OA-MEN with train.export)")
    _, net, dtype = served_models(scripted, contract, torch.device("cpu"))
    finder = load_serving_finder(args.finder, "cpu", dtype) if str(args.finder) else None
    files = sorted(args.images.glob("*.png"))[: args.batch]
    if len(files) < args.batch:
        raise SystemExit(f"need {args.batch} PNGs in {args.images}, found {len(files)}")
    blobs = [f.read_bytes() for f in files]
    for gated in (False, True, False, True):  # warm up both graphs
        request_path(net, contract, blobs, gated, finder=finder)
    rounds = []
    served_flip = contract.postprocess.flip_tta
    legs = [("without", False, served_flip), ("one_pass", True, False), ("with_flip", True, True)]
    for r in range(args.rounds):
        times = {}
        for name, gated, flip in legs if r % 2 == 0 else legs[::-1]:
            t0 = time.perf_counter()
            for _ in range(args.batches_per_round):
                request_path(net, contract, blobs, gated, flip, finder)
            times[name] = (time.perf_counter() - t0) / (args.batches_per_round * args.batch)
        times["with"] = times["with_flip" if served_flip else "one_pass"]  # the served path
        rounds.append({f"ms_per_image_{k}": 1000 * v for k, v in times.items()}
                      | {"gate_share": (times["with"] - times["without"]) / times["with"],
                         "flip_cost": times["with_flip"] / times["one_pass"]})  # fmt: skip
    shares = [r["gate_share"] for r in rounds]
    result = {
        "model": f"{contract.model_name} v{contract.model_version}",
        "batch": args.batch,
        "dtype": str(dtype).removeprefix("torch."),
        "finder": finder is not None,
        "flip_tta": contract.postprocess.flip_tta,
        "torch_threads": torch.get_num_threads(),
        "rounds": rounds,
        "gate_share_median": statistics.median(shares),
        "gate_share_range": [min(shares), max(shares)],
        "ms_per_image_without_median": statistics.median(r["ms_per_image_without"] for r in rounds),
        "ms_per_image_with_median": statistics.median(r["ms_per_image_with"] for r in rounds),
        "ms_per_image_one_pass_median": statistics.median(r["ms_per_image_one_pass"] for r in rounds),
        "ms_per_image_with_flip_median": statistics.median(r["ms_per_image_with_flip"] for r in rounds),
        "flip_cost_median": statistics.median(r["flip_cost"] for r in rounds),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=2))
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
