"""Served against in-process throughput and idle latency, measured side by side in one run.

``python -m ops.bench serve [--batch 8] [--delay 50] [--concurrency 16] [--seconds 30]``: the handler's request
path in process, the same batch size through TorchServe under REST clients, and one request at a time against
model time + max batch delay + 20 ms. A benchmark, not a test: compare ratios from one run, not absolute numbers.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

from ops.bench.common import ROOT, in_process, server
from ops.load import drive, idle_latency
from ops.load import image_bodies as load_images
from ops.results import DATA_IMAGES, write_result


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--delay", type=int, default=50, help="max batch delay, ms")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--images", type=Path, default=DATA_IMAGES)
    p.add_argument("--max-images", type=int, default=64)
    p.add_argument("--model", type=Path, default=ROOT / "build" / "oamen.pt")
    p.add_argument("--store", type=Path, default=ROOT / "model_store")
    p.add_argument("--json", type=Path, default=None)
    return p


def main(args: argparse.Namespace) -> dict:
    images = load_images(args.images, args.max_images)
    b = args.batch
    ip = in_process(args.model, images, b, min(10.0, args.seconds / 3))
    with server(args.store, b, args.delay) as srv:
        idle = idle_latency(srv, images)
        rest = drive(srv, images, "rest", args.concurrency, args.seconds)
    model_ms_b1 = 1000 / ip["model_ips_b1"]
    result = {
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "batch": b,
        "max_batch_delay_ms": args.delay,
        "concurrency": args.concurrency,
        "images": len(images),
        **ip,
        **{f"served_{k}": v for k, v in rest.items()},
        "idle_p50_ms": idle,
        "served_over_pipeline": rest["rps"] / ip[f"pipeline_ips_b{b}"],
        "served_over_model": rest["rps"] / ip[f"model_ips_b{b}"],
        "idle_budget_ms": model_ms_b1 + args.delay + 20,
    }
    print(
        f"batch {b}, max delay {args.delay} ms, {args.concurrency} REST clients, "
        f"{args.seconds:.0f} s, {len(images)} images"
    )
    print("| measure | value |\n|---|---|")
    for k, v in result.items():
        print(f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |")
    print(
        f"\nserved / in-process pipeline = {result['served_over_pipeline']:.2f} (target >= 0.90); "
        f"idle p50 {idle:.0f} ms vs model {model_ms_b1:.0f} ms + delay {args.delay} ms + 20 ms "
        f"= {result['idle_budget_ms']:.0f} ms"
    )
    write_result(args.json, result)
    return result
