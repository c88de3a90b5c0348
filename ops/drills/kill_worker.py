"""Fault injection: SIGKILL TorchServe's Python worker under load and measure how the service recovers.

``python -m ops.drills.kill_worker [--seconds 30] [--clients 4] [--kill-at 10] [--json PATH]``: closed-loop
REST clients against a private server (or ``--workdir``'s), the worker killed at ``--kill-at`` s, the load
kept on until a new READY worker answers. What counts as in flight, recovered and passed, and the exit
status: docs/RELIABILITY.md ("Worker killed under load").
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ops import server as ts
from ops.drills.common import WORKER_MARK, add_drill_args, management_workers, worker_processes, write_drill
from ops.load import LoadDriver, Record
from ops.load import image_bodies as load_images
from ops.server import serving

POLL_S = 0.2


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=30.0, help="load duration (extended until recovery + --after)")
    p.add_argument("--clients", type=int, default=4, help="closed-loop REST client threads")
    p.add_argument("--kill-at", type=float, default=10.0, help="seconds after the load starts")
    p.add_argument("--grace", type=float, default=1.0, help="s after the kill still counted as in flight")
    p.add_argument("--after", type=float, default=3.0, help="s of load kept after recovery at the least")
    p.add_argument("--recovery-timeout", type=float, default=90.0, help="s to wait for a new READY worker")
    p.add_argument("--workdir", type=Path, default=None, help="a running server's workdir (default: a private one)")
    return add_drill_args(p)


@dataclass
class Kill:
    """The killed worker's pid and ``time.monotonic()`` just before the kill."""

    pid: int
    t_kill: float


def kill_worker(srv: ts.Server) -> Kill:
    """SIGKILL the model's worker process."""
    java = ts.server_pid(Path(srv.workdir))
    if java is None:
        raise RuntimeError(f"no TorchServe pid file in {srv.workdir}/tmp: is the server running?")
    procs = worker_processes(java)
    api_pids = [w.get("pid") for w in management_workers(srv)]
    if len(procs) != 1:
        raise RuntimeError(f"expected one {WORKER_MARK} child of Java pid {java}, found {[p.pid for p in procs]}")
    pid = procs[0].pid
    if api_pids and pid not in api_pids:
        raise RuntimeError(f"worker pid {pid} (process tree) is not the management API's {api_pids}")
    t_kill = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    return Kill(pid, t_kill)


def wait_for_new_worker(srv: ts.Server, old_pid: int, timeout: float) -> dict[str, Any]:
    """Poll the management API until a READY worker with a pid other than ``old_pid`` shows up.

    Returns {'new_pid', 't_new_pid' (first poll showing another pid), 't_ready', 'states'}; the
    times are ``time.monotonic()`` or None when ``timeout`` passed first.
    """
    out: dict[str, Any] = {"new_pid": None, "t_new_pid": None, "t_ready": None, "states": []}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = management_workers(srv)
        now = time.monotonic()
        state = [(w.get("pid"), w.get("status")) for w in workers]
        if not out["states"] or out["states"][-1][1] != state:
            out["states"].append((now, state))
        others = [w for w in workers if w.get("pid") not in (None, -1, old_pid)]
        if others and out["t_new_pid"] is None:
            out["t_new_pid"] = now
        ready = [w for w in others if w.get("status") == "READY"]
        if ready:
            out["new_pid"], out["t_ready"] = ready[0]["pid"], now
            return out
        time.sleep(POLL_S)
    return out


def analyse(
    records: list[Record], t_kill: float, t0: float, old_pid: int, probe: dict[str, Any], clients: int, grace: float
) -> dict[str, Any]:
    """The drill's figures from the request records and the management API probe (see module docstring)."""
    fails = [r for r in records if not r.ok]
    in_flight = [r for r in records if r.start < t_kill + grace and r.end >= t_kill]
    strict = [r for r in records if r.start < t_kill <= r.end]
    fails_in_flight = [r for r in fails if r.start < t_kill + grace and r.end >= t_kill]
    t_new = probe["t_new_pid"]
    first_ok = min((r.end for r in records if r.ok and t_new is not None and r.end >= t_new), default=None)
    t_recovered = max(first_ok, probe["t_ready"]) if first_ok is not None and probe["t_ready"] else None
    after = [r for r in records if t_recovered is not None and r.start >= t_recovered]
    recovered = probe["new_pid"] is not None and probe["new_pid"] != old_pid and first_ok is not None

    def rel(t: float | None) -> float | None:
        return None if t is None else round(t - t_kill, 3)

    result = {
        "clients": clients,
        "kill_at_s": round(t_kill - t0, 3),
        "grace_s": grace,
        "old_pid": old_pid,
        "new_pid": probe["new_pid"],
        "new_pid_differs": probe["new_pid"] is not None and probe["new_pid"] != old_pid,
        "requests": len(records),
        "requests_before_kill": sum(r.end < t_kill for r in records),
        "requests_after_kill": sum(r.start >= t_kill for r in records),
        "in_flight_at_kill": len(in_flight),
        "strictly_in_flight_at_kill": len(strict),
        "failed": len(fails),
        "failed_in_flight": len(fails_in_flight),
        "failed_not_in_flight": len(fails) - len(fails_in_flight),
        "failure_statuses": sorted({r.status for r in fails}),
        "failure_examples": sorted({r.error for r in fails})[:3],
        "new_pid_seen_s": rel(t_new),
        "first_ok_after_kill_s": rel(first_ok),
        "ready_after_kill_s": rel(probe["t_ready"]),
        "requests_after_recovery": len(after),
        "failed_after_recovery": sum(not r.ok for r in after),
        "recovered": recovered,
    }
    result["passed"] = bool(
        recovered and result["failed_not_in_flight"] == 0 and result["failed_after_recovery"] == 0 and after
    )
    return result


def run_fault(
    srv: ts.Server,
    images: list[bytes],
    clients: int = 4,
    seconds: float = 30.0,
    kill_at: float = 10.0,
    grace: float = 1.0,
    after: float = 3.0,
    recovery_timeout: float = 90.0,
) -> tuple[dict[str, Any], list[Record]]:
    """Drive load, kill the worker at ``kill_at`` s, wait for recovery, keep the load ``after`` s more.

    The load lasts ``seconds`` or until ``after`` s past recovery, whichever is later (bounded by
    ``recovery_timeout``). Returns the figures of `analyse` and the records (times relative to
    the start of the load).
    """
    if not 0 < kill_at < seconds:
        raise ValueError(f"kill_at must be in (0, seconds={seconds}), got {kill_at}")
    driver = LoadDriver(srv, images, clients)
    t0 = time.monotonic()
    driver.start()
    try:
        time.sleep(kill_at)
        kill = kill_worker(srv)
        old_pid, t_kill = kill.pid, kill.t_kill
        probe = wait_for_new_worker(srv, old_pid, recovery_timeout)
        end = max(t0 + seconds, (probe["t_ready"] or time.monotonic()) + after)
        time.sleep(max(0.0, end - time.monotonic()))
    finally:
        records = driver.stop()
    result = analyse(records, t_kill, t0, old_pid, probe, clients, grace)
    result["worker_states"] = [(round(t - t_kill, 3), s) for t, s in probe["states"]]
    shifted = [Record(**{**asdict(r), "start": r.start - t0, "end": r.end - t0}) for r in records]
    return result, shifted


def print_table(result: dict[str, Any]) -> None:
    keys = [
        "clients", "kill_at_s", "old_pid", "new_pid", "new_pid_differs", "requests", "requests_before_kill",
        "requests_after_kill", "in_flight_at_kill", "strictly_in_flight_at_kill", "failed", "failed_in_flight",
        "failed_not_in_flight", "failure_statuses", "new_pid_seen_s", "first_ok_after_kill_s", "ready_after_kill_s",
        "requests_after_recovery", "failed_after_recovery", "recovered", "passed",
    ]  # fmt: skip
    print("| measure | value |\n|---|---|")
    for k in keys:
        print(f"| {k} | {result.get(k)} |")


def main(args: argparse.Namespace) -> int:
    images = load_images(args.images, args.max_images)
    with serving(args.store, args.workdir) as srv:
        result, records = run_fault(
            srv, images, args.clients, args.seconds, args.kill_at, args.grace, args.after, args.recovery_timeout
        )
    print(f"SIGKILL of the worker at {result['kill_at_s']:.1f} s under {args.clients} REST clients")
    print_table(result)
    if result["failure_examples"]:
        print("\nfailures: " + "; ".join(result["failure_examples"]))
    write_drill(args, result, records)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
