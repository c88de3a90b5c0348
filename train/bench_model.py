"""Size and CPU speed of every registered model, measured side by side in one run.

``python -m train.bench_model`` (``make bench-model``) prints, per model: parameters, GFLOPs
for one 224 px image (torch's FlopCounterMode, which counts a multiply-add as 2 FLOPs; papers
that quote "FLOPs" usually mean multiply-adds, half of this), and CPU images/s at batch 1 and
16 with TorchScript in inference mode. Models are timed in interleaved rounds (the best round
is kept), so background load on a shared machine affects them alike and ratios stay fair.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from model import list_models
from train.model_speed import benchmark


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Parameters, GFLOPs and CPU images/s of registered models.")
    p.add_argument("--models", nargs="*", default=None, help="default: every registered model")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; the best is kept")
    p.add_argument("--min-seconds", type=float, default=1.0, help="minimum time per measurement")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    return p


def format_table(rows: list[dict], batches: tuple[int, ...]) -> str:
    head = ["model", "params (M)", "GFLOPs"] + [f"img/s b{b}" for b in batches]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], f"{r['params_m']:.2f}", f"{r['gflops']:.2f}"] + [f"{r[f'ips_b{b}']:.1f}" for b in batches]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> list[dict]:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    names = args.models or list_models()
    rows = benchmark(names, args.input_size, tuple(args.batches), args.rounds, args.min_seconds)
    print(f"CPU: {torch.get_num_threads()} torch threads, input {args.input_size} px, TorchScript, inference mode")
    print(format_table(rows, tuple(args.batches)))
    by = {r["model"]: r for r in rows}
    if "oamen" in by and "resnet18" in by:
        b1 = args.batches[0]
        ratio = by["resnet18"][f"ips_b{b1}"] / by["oamen"][f"ips_b{b1}"]
        print(f"\noamen batch-{b1} time / resnet18 batch-{b1} time = {ratio:.2f}x (budget: <= 1.5x)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
