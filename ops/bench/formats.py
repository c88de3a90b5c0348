"""Served in float32 against the int8 trunk: throughput at saturation and idle latency, in alternating servers.

``python -m ops.bench formats [--rounds 3] [--seconds 15] [--json docs/results/bench_formats.json]``: for each
round, a private TorchServe with ``KOA_PRECISION=fp32`` and one with ``KOA_PRECISION=int8`` (the grader's
ResNet trunk in int8, `model.quantize`; what ``auto`` picks on a CPU without native bfloat16), in alternating
order, each at the shipped batching (config.properties): first a JIT warm-up under load, then one request at
a time (idle latency), then REST clients at saturation. The rounds alternate so that this machine's drift
favours neither; the ratios are taken per round, then their median.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
from pathlib import Path

import torch

from model.precision import ENV
from ops.bench.common import ROOT, server
from ops.load import drive, idle_latency
from ops.load import image_bodies as load_images
from ops.results import DATA_IMAGES, DOC_RESULTS, write_result

FORMATS = ("fp32", "int8")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=15.0, help="measured seconds at saturation per server")
    p.add_argument("--warm-seconds", type=float, default=20.0, help="load before measuring (Java's JIT)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--images", type=Path, default=DATA_IMAGES)
    p.add_argument("--max-images", type=int, default=64)
    p.add_argument("--store", type=Path, default=ROOT / "model_store")
    p.add_argument("--json", type=Path, default=DOC_RESULTS / "bench_formats.json")
    return p


def one_server(fmt: str, args: argparse.Namespace, images: list[bytes]) -> dict:
    before = os.environ.get(ENV)
    os.environ[ENV] = fmt  # the worker inherits the frontend's environment (ops.server)
    try:
        with server(args.store, None, None) as srv:  # the shipped batching
            drive(srv, images, "rest", args.concurrency, args.warm_seconds)
            idle = idle_latency(srv, images)
            rest = drive(srv, images, "rest", args.concurrency, args.seconds)
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before
    return {"format": fmt, "rps": rest["rps"], "p50_ms": rest["p50_ms"], "failures": rest["failures"], "idle_ms": idle}


def main(args: argparse.Namespace) -> dict:
    images = load_images(args.images, args.max_images)
    rows = []
    for k in range(args.rounds):
        for fmt in FORMATS if k % 2 == 0 else FORMATS[::-1]:
            row = {"round": k + 1, **one_server(fmt, args, images)}
            print(row, flush=True)
            rows.append(row)

    def per_round(measure: str) -> list[float]:
        by = {(r["round"], r["format"]): r[measure] for r in rows}
        return [by[(k + 1, "int8")] / by[(k + 1, "fp32")] for k in range(args.rounds)]

    result = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "batching": "config.properties",
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "rounds": rows,
        "median": {
            fmt: {m: statistics.median(r[m] for r in rows if r["format"] == fmt) for m in ("rps", "idle_ms")}
            for fmt in FORMATS
        },
        "rps_ratio_int8_over_fp32": per_round("rps"),
        "idle_ratio_int8_over_fp32": per_round("idle_ms"),
    }
    write_result(args.json, result)
    print(f"int8 / fp32 requests/s per round: {', '.join(f'{x:.2f}' for x in result['rps_ratio_int8_over_fp32'])}")
    return result
