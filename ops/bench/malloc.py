"""The worker's malloc settings (`handler/memory.py`) against glibc's defaults, in fresh processes.

``python -m ops.bench malloc [--runs 5] [--seconds 8] [--batch 16]`` (``make bench-malloc``): per run, two fresh
processes (one with ``KOA_MALLOC=default``, the order alternating) each measure the handler's request path and
their resident memory. Why fresh processes: docs/BENCHMARKS.md ("Worker memory allocator").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from handler.memory import ENV
from model.paths import ROOT
from ops.bench.report import malloc_report
from ops.load import image_bodies as load_images
from ops.results import DATA_IMAGES, DOC_RESULTS, write_result


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--images", type=Path, default=DATA_IMAGES)
    p.add_argument("--model", type=Path, default=ROOT / "build" / "oamen.pt")
    p.add_argument("--json", type=Path, default=DOC_RESULTS / "bench_malloc.json", help="the result (committed)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p


def child(args: argparse.Namespace) -> None:
    import psutil

    # torch and the model are loaded in the child only: the parent just starts the children and reads them.
    from ops.bench.common import load_predictor, pipeline_rate

    images = load_images(args.images, 64)
    ips = pipeline_rate(load_predictor(args.model), images, args.batch, args.seconds)
    print(json.dumps({"ips": ips, "rss_mb": psutil.Process().memory_info().rss / 2**20}))


def one(args: argparse.Namespace, setting: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if setting == "glibc default":
        env[ENV] = "default"
    cmd = [sys.executable, "-m", "ops.bench", "malloc", "--child", "--seconds", str(args.seconds)]
    cmd += ["--batch", str(args.batch)]
    cmd += ["--images", str(args.images), "--model", str(args.model)]
    out = subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return {"setting": setting, **json.loads(out.strip().splitlines()[-1])}


def main(args: argparse.Namespace) -> list[dict]:
    if args.child:  # one measurement, in the fresh process `one` started
        child(args)
        return []
    settings = ["glibc default", "handler/memory.py"]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = []
    for k in range(args.runs):
        for setting in settings if k % 2 == 0 else settings[::-1]:
            rows.append({"run": k + 1, **one(args, setting)})
            print(f"run {k + 1}, {setting}: {rows[-1]['ips']:.1f} img/s, {rows[-1]['rss_mb']:.0f} MB", flush=True)
    result = {
        "started": started,
        "config": {"runs": args.runs, "seconds": args.seconds, "batch": args.batch, "images": str(args.images)},
        "rows": rows,
    }
    print(malloc_report(result))
    write_result(args.json, result)
    return rows
