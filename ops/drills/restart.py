"""Restart drill: stop and start TorchServe under load; no request may be lost or answered wrongly.

``python -m ops.drills.restart [--seconds 40] [--clients 4] [--grpc-clients 1] [--restart-at 10]
[--retry-s 120] [--drain-s 30] [--json PATH]``: what ``make restart`` does (drain, stop, start on the same
ports), under clients built as an integrator should build them. What is counted as lost, wrong, resent or
reset, and the exit status: docs/RELIABILITY.md ("Restart under load").
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ops import server as ts
from ops.drills.common import add_drill_args, write_drill
from ops.load import LoadDriver, Record
from ops.load import image_bodies as load_images
from ops.server import serving

PROB_TOL = 1e-4


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=40.0, help="load duration (extended to --after past the restart)")
    p.add_argument("--clients", type=int, default=4, help="closed-loop client threads")
    p.add_argument("--grpc-clients", type=int, default=1, help="how many of them use gRPC")
    p.add_argument("--restart-at", type=float, default=10.0, help="seconds after the load starts")
    p.add_argument("--after", type=float, default=5.0, help="s of load kept once the server is back")
    p.add_argument("--retry-s", type=float, default=120.0, help="the clients' retry window, s")
    p.add_argument("--drain-s", type=float, default=ts.DRAIN_S, help="ts.stop's drain limit; 0: plain stop")
    return add_drill_args(p)


def restart(srv: ts.Server, store: Path, drain_s: float = ts.DRAIN_S) -> tuple[float, float, float]:
    """``make restart`` on a private server: stop, then start with its rendered config (same ports).

    Returns ``time.monotonic()`` at the stop call, when the old server was gone and when the new one was READY.
    """
    workdir = Path(srv.workdir)
    t_stop = time.monotonic()
    ts.stop(workdir, drain_s=drain_s)
    t_down = time.monotonic()
    ts.start(store, workdir / "config.properties", workdir)
    return t_stop, t_down, time.monotonic()


def inconsistent(records: list[Record]) -> list[Record]:
    """Answered requests whose grade or probabilities differ from the first answer for the same image and kind."""
    first: dict[tuple[int, str], Record] = {}
    bad = []
    for r in sorted((r for r in records if r.ok), key=lambda r: r.start):
        ref = first.setdefault((r.image, r.kind), r)
        probs, ref_probs = r.probabilities or [], ref.probabilities or []
        if (
            r.grade != ref.grade
            or len(probs) != len(ref_probs)
            or any(abs(a - b) > PROB_TOL for a, b in zip(probs, ref_probs))
        ):
            bad.append(r)
    return bad


def analyse(records: list[Record], t_stop: float, t_down: float, t_up: float) -> dict[str, Any]:
    lost = [r for r in records if not r.ok]
    wrong = inconsistent(records)
    resent = [r for r in records if r.ok and r.retried]
    spanning = [r for r in records if r.start < t_up and r.end > t_stop]
    attempt_errors = Counter(e for r in records for e in r.retried)
    result = {
        "requests": len(records),
        "by_protocol": dict(Counter(r.protocol for r in records)),
        "answered_before_stop": sum(r.ok and r.end < t_stop for r in records),
        "answered_after_restart": sum(r.ok and r.start >= t_up for r in records),
        "spanning_the_restart": len(spanning),
        "lost": len(lost),
        "wrong": len(wrong),
        "resent_then_answered": len(resent),
        "connections_reset": attempt_errors.get("reset", 0),
        "failed_attempts_by_error": dict(attempt_errors.most_common()),
        "stop_s": round(t_down - t_stop, 2),
        "start_s": round(t_up - t_down, 2),
        "longest_request_s": round(max((r.end - r.start for r in records), default=0.0), 2),
        "lost_examples": sorted({r.error for r in lost})[:3],
    }
    result["passed"] = bool(
        not lost and not wrong and result["answered_before_stop"] > 0 and result["answered_after_restart"] > 0
    )
    return result


def run_restart(
    srv: ts.Server,
    store: Path,
    images: list[bytes],
    clients: int = 4,
    grpc_clients: int = 1,
    seconds: float = 40.0,
    restart_at: float = 10.0,
    after: float = 5.0,
    retry_s: float = 120.0,
    drain_s: float = ts.DRAIN_S,
) -> tuple[dict[str, Any], list[Record]]:
    """Load, restart at ``restart_at`` s, load ``after`` s more; the figures of `analyse` and the records."""
    if not 0 < restart_at < seconds:
        raise ValueError(f"restart_at must be in (0, seconds={seconds}), got {restart_at}")
    driver = LoadDriver(srv, images, clients, retry_s=retry_s, grpc_clients=grpc_clients)
    t0 = time.monotonic()
    driver.start()
    try:
        time.sleep(restart_at)
        t_stop, t_down, t_up = restart(srv, store, drain_s)
        time.sleep(max(0.0, max(t0 + seconds, t_up + after) - time.monotonic()))
    finally:
        records = driver.stop()
    result = {"clients": clients, "grpc_clients": grpc_clients, "retry_s": retry_s, "drain_s": drain_s}
    result["restart_at_s"] = restart_at
    result.update(analyse(records, t_stop, t_down, t_up))
    shifted = [Record(**{**asdict(r), "start": r.start - t0, "end": r.end - t0}) for r in records]
    return result, shifted


def main(args: argparse.Namespace) -> int:
    images = load_images(args.images, args.max_images)
    with serving(args.store) as srv:
        result, records = run_restart(
            srv,
            args.store,
            images,
            args.clients,
            args.grpc_clients,
            args.seconds,
            args.restart_at,
            args.after,
            args.retry_s,
            args.drain_s,
        )
    print(
        f"restart at {args.restart_at:g} s under {args.clients} clients ({args.grpc_clients} gRPC), "
        f"client retry window {args.retry_s:g} s"
    )
    print("| measure | value |\n|---|---|")
    for k, v in result.items():
        if k != "lost_examples":
            print(f"| {k} | {v} |")
    if result["lost_examples"]:
        print("\nlost: " + "; ".join(result["lost_examples"]))
    write_drill(args, result, records)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
