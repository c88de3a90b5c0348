"""The worker's malloc settings (`handler/memory.py`) against glibc's defaults, in fresh processes.

``python scripts/bench_malloc.py [--runs 5] [--seconds 8] [--batch 16]`` (``make bench-malloc``)

Each run starts two fresh Python processes one after the other (the order alternates), one with
``KOA_MALLOC=default``; each measures the handler's request path (decode, preprocess, batch,
TorchScript) at ``--batch`` for ``--seconds`` and its resident memory. Fresh processes matter:
glibc's dynamic tuning drifts with a process's history, so two settings inside one long process
do not compare. Prints a Markdown table and the medians. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from handler.memory import ENV  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "data" / "koa" / "val")
    p.add_argument("--model", type=Path, default=ROOT / "build" / "oamen.pt")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p


def child(args: argparse.Namespace) -> None:
    import psutil
    from bench_serve import load_images, load_predictor, pipeline_rate

    images = load_images(args.images, 64)
    ips = pipeline_rate(load_predictor(args.model), images, args.batch, args.seconds)
    print(json.dumps({"ips": ips, "rss_mb": psutil.Process().memory_info().rss / 2**20}))


def one(args: argparse.Namespace, setting: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if setting == "glibc default":
        env[ENV] = "default"
    cmd = [sys.executable, __file__, "--child", "--seconds", str(args.seconds), "--batch", str(args.batch)]
    cmd += ["--images", str(args.images), "--model", str(args.model)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return {"setting": setting, **json.loads(out.strip().splitlines()[-1])}


def main(args: argparse.Namespace) -> list[dict]:
    settings = ["glibc default", "handler/memory.py"]
    rows = []
    for k in range(args.runs):
        for setting in settings if k % 2 == 0 else settings[::-1]:
            rows.append({"run": k + 1, **one(args, setting)})
            print(f"run {k + 1}, {setting}: {rows[-1]['ips']:.1f} img/s, {rows[-1]['rss_mb']:.0f} MB", flush=True)
    print(f"\n| run | setting | request path, batch {args.batch} (img/s) | resident memory (MB) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['setting']} | {r['ips']:.1f} | {r['rss_mb']:.0f} |")
    med = {s: statistics.median(r["ips"] for r in rows if r["setting"] == s) for s in settings}
    rss = {s: statistics.median(r["rss_mb"] for r in rows if r["setting"] == s) for s in settings}
    print(
        f"\nmedian: {med[settings[0]]:.1f} -> {med[settings[1]]:.1f} img/s "
        f"(x{med[settings[1]] / med[settings[0]]:.2f}), resident memory {rss[settings[0]]:.0f} -> "
        f"{rss[settings[1]]:.0f} MB"
    )
    return rows


if __name__ == "__main__":
    a = get_args_parser().parse_args()
    child(a) if a.child else main(a)
