"""Bounded soak run: steady REST load on a private TorchServe, watching the servers' memory for leaks.

``python -m ops.drills.soak [--minutes 10] [--clients 4] [--warmup 1] [--interval 10] [--explain-share 0.1]
[--json PATH]``: samples the worker's and Java's resident memory and Java's live heap (from a GC log) while
the load runs, and writes the figures, the samples, the GC log and a plot. How growth is measured, the
target and the exit status: docs/RELIABILITY.md ("Soak").
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from ops import server as ts
from ops.drills.common import ROOT, add_drill_args, publish, worker_processes
from ops.load import LoadDriver
from ops.load import image_bodies as load_images
from ops.server import serving

MB = 1024 * 1024
# e.g. "[12.345s][info][gc] GC(7) Pause Young (Normal) (G1 Evacuation Pause) 52M->12M(256M) 3.456ms"
GC_LINE = re.compile(r"^\[(?P<up>\d+\.\d+)s\].*GC\(\d+\) .*? (?P<before>\d+)M->(?P<after>\d+)M\((?P<committed>\d+)M\)")
FIELDS = ["t_s", "worker_pid", "worker_rss_mb", "java_rss_mb", "requests", "failures", "rps"]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="length of the whole run, warm-up included")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--warmup", type=float, default=1.0, help="minutes before the RSS baseline is taken")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--explain-share", type=float, default=0.1, help="fraction of requests that are explanations")
    p.add_argument("--target", type=float, default=10.0, help="allowed RSS growth after the warm-up, %%")
    return add_drill_args(p, ROOT / "reports" / "soak" / "soak.json")


def rss_mb(pid: int | None) -> float | None:
    """Resident memory of ``pid`` in MB, None when it is gone."""
    try:
        return psutil.Process(pid).memory_info().rss / MB if pid else None
    except psutil.Error:
        return None


def sample(srv: ts.Server) -> dict[str, Any]:
    """The worker's pid and RSS and the Java frontend's RSS right now (MB)."""
    java = ts.server_pid(Path(srv.workdir))
    workers = worker_processes(java) if java else []
    wpid = workers[0].pid if workers else None
    return {"worker_pid": wpid, "worker_rss_mb": rss_mb(wpid), "java_rss_mb": rss_mb(java)}


def growth(samples: list[dict[str, Any]], key: str) -> dict[str, float | None]:
    """Baseline (first sample), last, peak and growth in % of the baseline, for column ``key``."""
    values = [s[key] for s in samples if s[key] is not None]
    if not values:
        return {"baseline_mb": None, "last_mb": None, "peak_mb": None, "growth_pct": None, "peak_growth_pct": None}
    base = values[0]
    return {
        "baseline_mb": round(base, 1),
        "last_mb": round(values[-1], 1),
        "peak_mb": round(max(values), 1),
        "growth_pct": round(100 * (values[-1] - base) / base, 2),
        "peak_growth_pct": round(100 * (max(values) - base) / base, 2),
    }


def java_heap(gc_log: Path, uptime_at_t0: float) -> list[dict[str, float]]:
    """Java's heap after each collection from a ``-Xlog:gc:file=...:uptime`` log: t_s (since the load began),
    after_mb (in use after it) and committed_mb."""
    out = []
    if not gc_log.is_file():
        return out
    for line in gc_log.read_text(errors="replace").splitlines():
        m = GC_LINE.match(line)
        if m:
            t = float(m["up"]) - uptime_at_t0
            out.append({"t_s": round(t, 2), "after_mb": float(m["after"]), "committed_mb": float(m["committed"])})
    return out


def live_heap_growth(heap: list[dict[str, float]], warmup_s: float, end_s: float) -> dict[str, Any]:
    """Median heap after GC in the first minute after the warm-up and in the last minute; growth in %."""
    first = [h["after_mb"] for h in heap if warmup_s <= h["t_s"] < warmup_s + 60]
    last = [h["after_mb"] for h in heap if end_s - 60 <= h["t_s"] <= end_s]
    committed = [h["committed_mb"] for h in heap if h["t_s"] >= warmup_s]
    if not first or not last:
        return {"collections": len(heap), "first_mb": None, "last_mb": None, "growth_pct": None}
    a, b = statistics.median(first), statistics.median(last)
    return {
        "collections": len(heap),
        "first_mb": a,
        "last_mb": b,
        "growth_pct": round(100 * (b - a) / a, 2) if a else None,
        "committed_first_mb": committed[0] if committed else None,
        "committed_last_mb": committed[-1] if committed else None,
    }


@dataclass
class SoakRun:
    """What a soak saw: the samples (one every interval), and the requests sent and failed in all."""

    samples: list[dict[str, Any]]
    requests: int
    failures: int


def soak(
    srv: ts.Server, images: list[bytes], clients: int, seconds: float, interval: float, explain_share: float
) -> SoakRun:
    """Load for ``seconds``, a sample every ``interval`` s (the first at t=0)."""
    driver = LoadDriver(srv, images, clients, explain_share=explain_share).start()
    t0 = time.monotonic()
    samples: list[dict[str, Any]] = []
    try:
        k = 0
        while True:
            now = time.monotonic()
            recs = driver.records()
            prev = samples[-1]["t_s"] if samples else 0.0
            window = [r for r in recs if prev <= r.end - t0 < now - t0]
            fails = sum(not r.ok for r in window)
            span = max(now - t0 - prev, 1e-9)
            rps = round(len(window) / span, 3) if samples else 0.0
            samples.append(
                {"t_s": round(now - t0, 2), **sample(srv), "requests": len(window), "failures": fails, "rps": rps}
            )
            if now - t0 >= seconds:
                break
            k += 1
            time.sleep(max(0.0, min(t0 + k * interval, t0 + seconds) - time.monotonic()))
    finally:
        records = driver.stop()
    return SoakRun(samples, len(records), sum(not r.ok for r in records))


def write_outputs(
    samples: list[dict[str, Any]],
    result: dict[str, Any],
    json_path: Path,
    warmup_s: float,
    heap: list[dict[str, float]] | None = None,
) -> None:
    """``json_path``, and next to it ``<stem>.csv`` and ``<stem>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    json_path.parent.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = json_path.with_suffix(".csv"), json_path.with_suffix(".png")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows({k: ("" if s[k] is None else s[k]) for k in FIELDS} for s in samples)
    fig, (ax, hx) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    t = [s["t_s"] / 60 for s in samples]
    for key, label in (("worker_rss_mb", "Python worker RSS"), ("java_rss_mb", "Java frontend RSS")):
        ax.plot(t, [float("nan") if s[key] is None else s[key] for s in samples], marker=".", label=label)
    ax.set_ylabel("RSS (MB)")
    ax.set_title(f"KOA-Serve soak: {result['requests']} requests, {result['failures']} failures")
    if heap:
        ht = [h["t_s"] / 60 for h in heap]
        hx.plot(ht, [h["committed_mb"] for h in heap], label="Java heap committed", color="tab:orange")
        hx.plot(ht, [h["after_mb"] for h in heap], ".", markersize=3, label="Java heap in use after GC")
    hx.set_ylabel("Java heap (MB)")
    hx.set_xlabel("minutes")
    for a in (ax, hx):
        a.axvline(warmup_s / 60, color="grey", linestyle="--", label="end of warm-up")
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    json_path.write_text(json.dumps({**result, "csv": str(csv_path), "png": str(png_path)}, indent=2))


def main(args: argparse.Namespace) -> int:
    if args.interval <= 0 or args.minutes <= 0 or not 0 <= args.warmup < args.minutes:
        raise ValueError(
            f"need interval > 0, minutes > 0 and 0 <= warmup < minutes; got {args.interval}, {args.minutes}, "
            f"{args.warmup}"
        )
    images = load_images(args.images, args.max_images)
    seconds, warmup_s = args.minutes * 60, args.warmup * 60
    gc_log = args.json.with_name(f"{args.json.stem}_gc.log").resolve()
    gc_log.parent.mkdir(parents=True, exist_ok=True)
    gc_log.unlink(missing_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with serving(args.store, properties={"vmargs": f"-Xlog:gc:file={gc_log}:uptime"}) as srv:
        java_started = psutil.Process(ts.server_pid(Path(srv.workdir))).create_time()
        uptime_at_t0 = time.time() - java_started
        run = soak(srv, images, args.clients, seconds, args.interval, args.explain_share)
    samples, total, failed = run.samples, run.requests, run.failures
    heap = java_heap(gc_log, uptime_at_t0)
    steady = [s for s in samples if s["t_s"] >= warmup_s]
    worker, java = growth(steady, "worker_rss_mb"), growth(steady, "java_rss_mb")
    live = live_heap_growth(heap, warmup_s, samples[-1]["t_s"] if samples else seconds)
    pids = sorted({s["worker_pid"] for s in samples if s["worker_pid"] is not None})
    ok_mem = all(g["growth_pct"] is not None and g["growth_pct"] <= args.target for g in (worker, live))
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result = {
        "started": started,
        "config": config,
        "requests": total,
        "failures": failed,
        "rps": round(total / samples[-1]["t_s"], 3) if samples and samples[-1]["t_s"] > 0 else None,
        "worker_pids": pids,
        "samples_after_warmup": len(steady),
        "worker": worker,
        "java": java,
        "java_live_heap": live,
        "passed": bool(ok_mem and failed == 0 and len(pids) == 1),
    }
    print(
        f"soak: {args.minutes:g} min, {args.clients} REST clients ({args.explain_share:.0%} explanations), "
        f"warm-up {args.warmup:g} min, sample every {args.interval:g} s"
    )
    print("| process | baseline MB | last MB | peak MB | growth % | peak growth % |\n|---|---|---|---|---|---|")
    for name, g in (("Python worker RSS", worker), ("Java frontend RSS", java)):
        print(
            f"| {name} | {g['baseline_mb']} | {g['last_mb']} | {g['peak_mb']} | {g['growth_pct']} | "
            f"{g['peak_growth_pct']} |"
        )
    print(
        f"\nJava live heap (after GC, median of the first and of the last minute): {live['first_mb']} -> "
        f"{live['last_mb']} MB ({live['growth_pct']} %), {live['collections']} collections; committed heap "
        f"{live.get('committed_first_mb')} -> {live.get('committed_last_mb')} MB"
    )
    print(f"requests {total}, failures {failed}, {result['rps']} req/s, worker pids {pids}")
    print(f"growth target <= {args.target:g} % (worker RSS, Java live heap): {'met' if ok_mem else 'MISSED'}")
    write_outputs(samples, result, args.json, warmup_s, heap)
    print(f"wrote {args.json}, {args.json.with_suffix('.csv')}, {gc_log}, {args.json.with_suffix('.png')}")
    if args.publish is not None:  # a result the docs quote (docs/results/soak.json), then the docs rendered
        publish(args.publish, result)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
