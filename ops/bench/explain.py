"""Latency of plain predictions while some requests ask for Integrated Gradients, before and after early answers.

``python -m ops.bench explain [--explain-share 0.1] [--method ig] [--load 0.5] [--rate 0]
[--seconds 60] [--rounds 2] [--threads 0] [--json reports/bench_explain.json] [--copy docs/results/bench_explain.json]``
(``make bench-explain``): two private servers from the same archive, ``KOA_EARLY_ANSWERS=0`` (before) and the
default (after), under the same seeded open-loop load in ABBA legs. The method: docs/BENCHMARKS.md
("Explanations off the hot path").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from handler.koa_handler import EARLY_ENV
from koa_client.rest import RestClient
from model.paths import ROOT
from model.settings import TORCH_THREADS
from ops import server as ts
from ops.load import Sender, leg, schedule

MODES = {"before": "0", "after": "1"}  # KOA_EARLY_ANSWERS of each mode's worker
RAMP_S = 5.0  # scheduled seconds at the start of a leg that are not counted
THREADS_ENV = TORCH_THREADS.name  # read by handler/koa_handler.py


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--explain-share", type=float, default=0.1, help="share of requests that ask for an explanation")
    p.add_argument("--method", default="ig", choices=("ig", "gradcam"))
    p.add_argument("--rate", type=float, default=0.0, help="requests/s; 0: from --load and the measured explanation")
    p.add_argument("--load", type=float, default=0.5, help="share of the worker's time spent explaining (--rate 0)")
    p.add_argument("--seconds", type=float, default=60.0, help="scheduled seconds per leg, the first 5 not counted")
    p.add_argument("--rounds", type=int, default=2, help="rounds of one leg per mode, order alternating (ABBA)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per worker (KOA_TORCH_THREADS); 0: torch's default, one per core, as shipped. "
        "Beside another CPU-bound process, 1 avoids oversubscribing the cores",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="", help="what else ran on the machine, kept in the JSON")
    p.add_argument("--image", type=Path, default=ROOT / "tests" / "fixtures" / "knee_kl2.png")
    p.add_argument("--model-store", type=Path, default=ROOT / "model_store")
    p.add_argument("--json", type=Path, default=ROOT / "reports" / "bench_explain.json")
    p.add_argument(
        "--copy",
        type=lambda text: Path(text) if text else None,
        default=ROOT / "docs" / "results" / "bench_explain.json",
        help="a second copy of the JSON, committed ('' for none)",
    )
    return p


def warm_up(sender: Sender) -> float:
    """Plain requests and two explanations one at a time; the seconds of the second explanation."""
    for _ in range(3):
        sender.call(False)
    sender.call(True)  # Captum's first attribution pays for its set-up
    t0 = time.perf_counter()
    ok, why = sender.call(True)
    if not ok:
        raise RuntimeError(f"warm-up explanation failed: {why}")
    return time.perf_counter() - t0


def start(store: Path, workdir: Path, early: str, threads: int) -> ts.Server:
    """A private server whose worker gets ``KOA_EARLY_ANSWERS=early`` (and ``threads``) through Java's environment."""
    env = {EARLY_ENV: early, **({THREADS_ENV: str(threads)} if threads > 0 else {})}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return ts.start_on_free_ports(store, workdir)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def summary(legs: list[dict[str, Any]], rounds: int) -> dict[str, Any]:
    """Per mode: median of the legs and their range (the spread), for plain and explain; ratios per round."""
    out: dict[str, Any] = {}
    for mode in MODES:
        mine = [g for g in legs if g["mode"] == mode]
        out[mode] = {}
        for kind in ("plain", "explain"):
            for key in ("p50_ms", "p95_ms", "p99_ms"):
                values = [g[kind][key] for g in mine if g[kind][key] is not None]
                if values:
                    out[mode][f"{kind}_{key}"] = {
                        "median": round(statistics.median(values), 1),
                        "legs": [round(v, 1) for v in values],
                    }
        out[mode]["failures"] = sum(g["failures"] for g in mine)
    ratios: dict[str, list[float]] = {"plain_p50": [], "plain_p95": []}
    for r in range(1, rounds + 1):
        pair = {g["mode"]: g for g in legs if g["round"] == r}
        for key in ("p50", "p95"):
            before, after = pair["before"]["plain"][f"{key}_ms"], pair["after"]["plain"][f"{key}_ms"]
            if before and after:
                ratios[f"plain_{key}"].append(round(after / before, 3))
    out["after_over_before_per_round"] = ratios
    return out


def table(legs: list[dict[str, Any]]) -> str:
    lines = [
        "| round | mode | plain n | plain p50 ms | plain p95 ms | plain p99 ms | explain n | explain p50 ms "
        "| failures |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for g in legs:
        p, e = g["plain"], g["explain"]
        cells = [f"{v:.0f}" if v is not None else "n/a" for v in (p["p50_ms"], p["p95_ms"], p["p99_ms"], e["p50_ms"])]
        lines.append(
            f"| {g['round']} | {g['mode']} | {p['n']} | {cells[0]} | {cells[1]} | {cells[2]} | {e['n']} | {cells[3]} "
            f"| {g['failures']} |"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if not 0 < args.explain_share < 1:
        raise ValueError(f"--explain-share must be in (0, 1), got {args.explain_share}")
    if args.rounds < 1 or args.seconds <= RAMP_S:
        raise ValueError(f"--rounds must be >= 1 and --seconds > {RAMP_S}")
    image = args.image.read_bytes()
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="koa-explain-") as tmp:
        servers: dict[str, ts.Server] = {}
        try:
            for mode, early in MODES.items():
                servers[mode] = start(args.model_store, Path(tmp) / mode, early, args.threads)
            senders = {mode: Sender(srv, image, args.method) for mode, srv in servers.items()}
            first = next(iter(servers.values()))
            served = RestClient(first.inference_url, token=first.keys()["inference"]).predict(image)["model"]
            explain_s = {mode: warm_up(s) for mode, s in senders.items()}
            rate = args.rate or args.load / (args.explain_share * statistics.fmean(explain_s.values()))
            plan = schedule(rate, args.seconds, args.explain_share, args.seed)
            print(
                f"explanation at batch 1: {explain_s}; {rate:.2f} requests/s, {len(plan)} per leg",
                file=sys.stderr,
                flush=True,
            )
            legs = []
            for r in range(1, args.rounds + 1):
                order = list(MODES) if r % 2 else list(reversed(MODES))
                for mode in order:
                    result = leg(senders[mode], plan, RAMP_S)
                    legs.append({"round": r, "mode": mode, **result})
                    p = result["plain"]
                    print(f"round {r} {mode}: plain p50 {p['p50_ms']} p95 {p['p95_ms']}", file=sys.stderr, flush=True)
        finally:
            for mode in servers:
                ts.stop(Path(tmp) / mode)
    md = table(legs)
    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "what": (
            "open-loop REST load, one TorchServe per mode (shipped batching, one worker); latency of plain "
            "predictions while a share of the requests ask for an explanation. before: a batch answered at once "
            f"({EARLY_ENV}=0); after: plain predictions answered before the batch's explanations"
        ),
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "model": f"{served['name']} {served['version']}",
        "explain_s_at_batch_1": {k: round(v, 3) for k, v in explain_s.items()},
        "rate_rps": round(rate, 3),
        "requests_per_leg": len(plan),
        "explain_per_leg": sum(e for _, e in plan),
        "ramp_s": RAMP_S,
        "legs": legs,
        "summary": summary(legs, args.rounds),
        "table": md,
        "took_s": round(time.monotonic() - t_start, 1),
    }
    print(md)
    print(json.dumps(result["summary"], indent=2))
    for path in (args.json, args.copy):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2) + "\n")
    return 0
