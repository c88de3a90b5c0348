"""Tail latency at 80% of saturation, per batching setting: the sweep behind config.properties' batching.

``python -m ops.bench tail [--settings 16x10,8x10,4x10] [--saturate-users 32] [--saturate-duration 30s]
[--users 16] [--duration 180s] [--load 0.8] [--repeat 1] [--protocols rest,grpc] [--json PATH]``
(``make bench-tail``): per setting, a private server, its capacity under saturating Locust users, then an
open-loop run at ``--load`` x capacity per protocol (``loadtest.run``). The method: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from model.paths import ROOT
from model.settings import TORCH_THREADS
from ops import server as ts
from ops.results import DOC_RESULTS, write_result

THREADS_ENV = TORCH_THREADS.name


def shipped_setting(config: Path = ROOT / "config.properties") -> str:
    """The batching ``config`` ships, as ``BATCHxDELAY_MS`` (its first model version)."""
    versions = next(iter(ts.models_property(config.read_text()).values()))
    cfg = next(iter(versions.values()))
    return f"{cfg['batchSize']}x{cfg['maxBatchDelay']}"


def served_model(weights: Path = ROOT / "weights" / "oamen.ckpt") -> str:
    """The grader `make archive` serves, as ``name version`` (the archive is built from these weights)."""
    # lazy: this process needs torch only here, to name the served model in the result
    from model.checkpoint import load_checkpoint

    c = load_checkpoint(weights)["contract"]
    return f"{c.model_name} {c.model_version}"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--settings",
        default=shipped_setting(),
        help="comma-separated BATCHxDELAY_MS[xWORKERS]; with several workers each gets cores / workers torch threads "
        "(default: config.properties' batching)",
    )
    p.add_argument("--saturate-users", type=int, default=32)
    p.add_argument("--saturate-duration", default="30s")
    p.add_argument("--users", type=int, default=16, help="open-loop users")
    p.add_argument("--duration", default="180s", help="open-loop run per protocol")
    p.add_argument("--load", type=float, default=0.8, help="fraction of the measured capacity")
    p.add_argument("--repeat", type=int, default=1, help="runs of each setting (a fresh server each time)")
    p.add_argument("--protocols", default="rest,grpc")
    p.add_argument("--images", type=Path, default=ROOT / "tests" / "fixtures")
    p.add_argument("--model-store", type=Path, default=ROOT / "model_store")
    p.add_argument("--json", type=Path, default=ROOT / "reports" / "bench_tail.json")
    p.add_argument(
        "--publish",
        type=Path,
        default=DOC_RESULTS / "bench_tail.json",
        help="add this sweep to the committed list and render the docs ('': neither)",
    )
    return p


def parse_settings(text: str) -> list[tuple[int, int, int]]:
    """``"16x10,4x5x2"`` -> ``[(16, 10, 1), (4, 5, 2)]`` (batch, delay ms, workers)."""
    out = []
    for item in text.split(","):
        parts = item.strip().split("x")
        if len(parts) == 2:
            parts.append("1")
        if len(parts) != 3 or not all(p.isdigit() for p in parts) or int(parts[0]) < 1 or int(parts[2]) < 1:
            raise ValueError(f"a setting is BATCHxDELAY_MS[xWORKERS] such as 16x10 or 8x10x2, got {item!r}")
        out.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return out


def locust(workdir: Path, out: Path, images: Path, protocols: str, users: int, duration: str, user_rate: float) -> dict:
    """One `loadtest.run` against the server in ``workdir``; its summary.json."""
    cmd = [
        sys.executable, "-m", "loadtest.run",
        "--workdir", str(workdir), "--out", str(out), "--images", str(images), "--protocols", protocols,
        "--users", str(users), "--rate", str(max(users, 1)), "--duration", duration, "--user-rate", str(user_rate),
    ]  # fmt: skip
    subprocess.run(cmd, check=False, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((out / "latest" / "summary.json").read_text())


def measure(args: argparse.Namespace, batch: int, delay: int, workers: int) -> dict[str, Any]:
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None
    with tempfile.TemporaryDirectory(prefix="koa-tail-") as tmp:
        workdir, out = Path(tmp) / "ts", Path(tmp) / "reports"
        saved = os.environ.get(THREADS_ENV)
        if threads is not None:  # the workers inherit it through Java
            os.environ[THREADS_ENV] = str(threads)
        try:
            ts.start_on_free_ports(args.model_store, workdir, batch_size=batch, max_batch_delay=delay, workers=workers)
        finally:
            os.environ.pop(THREADS_ENV, None)
            if saved is not None:
                os.environ[THREADS_ENV] = saved
        try:
            sat = locust(workdir, out, args.images, "rest", args.saturate_users, args.saturate_duration, 0.0)
            capacity = sat["rest"]["requests_per_s"]
            rate = args.load * capacity / args.users
            paced = locust(workdir, out, args.images, args.protocols, args.users, args.duration, rate)
        finally:
            ts.stop(workdir)
    row: dict[str, Any] = {"batch": batch, "delay_ms": delay, "workers": workers, "threads": threads}
    row.update(capacity_rps=capacity, user_rate=round(rate, 3))
    for name in args.protocols.split(","):
        s = paced[name.strip()]
        keys = ("requests", "failures", "requests_per_s", "p50_ms", "p95_ms", "p99_ms", "percentiles")
        row[name.strip()] = {k: s.get(k) for k in keys}
        row[name.strip()]["p99_over_p50"] = round(s["p99_ms"] / s["p50_ms"], 2) if s["p50_ms"] else None
    return row


def table(rows: list[dict[str, Any]], protocols: list[str]) -> str:
    head = "| run | batch | delay ms | workers | capacity req/s |"
    rule = "|---|---|---|---|---|"
    for p in protocols:
        head += f" {p} req/s | {p} p50 ms | {p} p95 ms | {p} p99 ms | {p} p99/p50 | {p} failures |"
        rule += "---|---|---|---|---|---|"
    lines = [head, rule]
    for r in rows:
        line = f"| {r['run']} | {r['batch']} | {r['delay_ms']} | {r['workers']} | {r['capacity_rps']:.1f} |"
        for p in protocols:
            s = r.get(p, {})
            ms = [f"{s[k]:.0f}" if isinstance(s.get(k), float | int) else "n/a" for k in ("p50_ms", "p95_ms", "p99_ms")]
            rate, ratio, failed = s.get("requests_per_s", 0), s.get("p99_over_p50"), s.get("failures")
            line += f" {rate:.1f} | {' | '.join(ms)} | {ratio} | {failed} |"
        lines.append(line)
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    settings = parse_settings(args.settings)
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    if not 0 < args.load <= 1:
        raise ValueError(f"--load must be in (0, 1], got {args.load}")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = []
    for run in range(1, args.repeat + 1):
        for batch, delay, workers in settings:
            t0 = time.monotonic()
            rows.append({"run": run, **measure(args, batch, delay, workers)})
            took = time.monotonic() - t0
            print(f"run {run}, {batch}x{delay}x{workers}: {took:.0f} s", file=sys.stderr, flush=True)
    md = table(rows, protocols)
    print(
        f"{args.load:.0%} of each setting's saturating REST throughput ({args.saturate_users} closed-loop users, "
        f"{args.saturate_duration}); {args.users} open-loop Locust users for {args.duration} per protocol; "
        f"{platform.processor() or platform.machine()}, load generator on the same CPU\n"
    )
    print(md)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    write_result(args.json, {"config": config, "rows": rows, "table": md})
    if str(args.publish) not in ("", "."):  # the committed list of sweeps docs/BENCHMARKS.md is rendered from
        sweeps = json.loads(args.publish.read_text()) if args.publish.is_file() else []
        model = served_model()
        sweeps.append({"sweep": f"{started}, make bench-tail, {model}", "model": model, "config": config, "rows": rows})
        write_result(args.publish, sweeps)
        # lazy, as served_model: rendering the docs loads the model code (torch), needed only to publish
        from ops import render_docs

        render_docs.main([])
    return 0
