"""What the secure front door costs: served throughput at saturation, plain HTTP against mutual TLS through the door.

``python -m ops.bench door [--rounds 2] [--seconds 20] [--clients 16]`` (``make bench-door``): one replica
behind `ops.door` with a development PKI made for the run; both paths measured each round, the order
alternating. The method and the cost's definition: docs/SECURITY.md ("The cost of the door").
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests

from ops import door, pki
from ops import server as ts
from ops.procs import free_ports, read_pid
from ops.results import DATA_IMAGES, DOC_RESULTS, ROOT, write_result

RAMP_S = 3.0


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--images", type=Path, default=DATA_IMAGES, help="PNG folder (default: the val split)")
    p.add_argument("--store", type=Path, default=ROOT / "model_store")
    p.add_argument("--json", type=Path, default=DOC_RESULTS / "bench_door.json")
    p.add_argument("--note", default="", help="what else the machine was doing (goes into the result)")
    return p


def request_images(folder: Path, limit: int = 64) -> list[bytes]:
    """Up to ``limit`` PNG bodies from ``folder`` (recursively); the test fixtures when it is not there."""
    paths = sorted(Path(folder).rglob("*.png"))[:limit] if Path(folder).is_dir() else []
    if not paths:
        paths = sorted((ROOT / "tests" / "fixtures").glob("knee_*.png"))
    if not paths:
        raise RuntimeError(f"no PNG request images in {folder} nor in tests/fixtures")
    return [p.read_bytes() for p in paths]


def saturate(url: str, images: list[bytes], clients: int, seconds: float, **session: Any) -> dict[str, Any]:
    """``clients`` closed-loop clients POSTing ``images`` to ``url`` for ``seconds`` after the ramp."""
    stop = threading.Event()
    counted = threading.Event()
    lock = threading.Lock()
    ok, failed, latencies = [0], [0], []

    def user(k: int) -> None:
        s = requests.Session()
        s.trust_env = False  # REQUESTS_CA_BUNDLE would override the CA given here
        s.headers.update(session.get("headers", {}))
        s.verify = session.get("verify", True)
        s.cert = session.get("cert")
        i = k
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                r = s.post(url, data=images[i % len(images)], headers={"Content-Type": "image/png"}, timeout=120)
                good = r.status_code == 200 and "kl_grade" in r.text
            except requests.RequestException:
                good = False
            if counted.is_set() and not stop.is_set():
                with lock:
                    if good:
                        ok[0] += 1
                        latencies.append((time.perf_counter() - t0) * 1000)
                    else:
                        failed[0] += 1
            i += clients
        s.close()

    with cf.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(user, k) for k in range(clients)]
        time.sleep(RAMP_S)
        counted.set()
        t0 = time.perf_counter()
        time.sleep(seconds)
        stop.set()
        wall = time.perf_counter() - t0
        for f in futures:
            f.result()
    latencies.sort()

    def pct(q: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1) if latencies else None

    return {"rps": ok[0] / wall, "ok": ok[0], "failures": failed[0], "p50_ms": pct(0.5), "p95_ms": pct(0.95)}


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by these processes (threads included)."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def door_pids(workdir: Path) -> list[int]:
    """HAProxy and the audit receiver of the door running from ``workdir``."""
    return [p for p in (read_pid(workdir / "haproxy.pid"), read_pid(workdir / "audit-receiver.pid")) if p]


def replica_pids(replica_workdir: Path) -> list[int]:
    """TorchServe's Java frontend and its workers."""
    java = ts.server_pid(replica_workdir)
    return [java, *ts.descendants(java)] if java else []


def main(args: argparse.Namespace) -> dict[str, Any]:
    images = request_images(args.images)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = os.getloadavg()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="koa-door-bench-") as tmp:
        base = Path(tmp)
        certs = pki.init(base / "certs")
        files = door.DoorFiles(
            str(certs / "server.pem"), str(certs / "ca.crt"), str(certs / "crl.pem"), str(certs / "clients.json")
        )
        client = door.client_add("bench", files, certs, policy=door.ClientPolicy(per_minute=1_000_000))
        assert client is not None
        front = door.DoorFront(*free_ports(3))
        workdir = base / "door"
        try:
            state = door.start(1, workdir, front, files, model_store=args.store)
            replica = state["replicas"][0]
            token = ts.read_keys(Path(replica["workdir"]))["inference"]
            paths = {
                "plain": (
                    f"http://127.0.0.1:{replica['rest_port']}/predictions/{ts.MODEL_NAME}",
                    {"headers": {"Authorization": f"Bearer {token}"}},
                ),
                "door": (
                    f"https://127.0.0.1:{front.rest_port}/predictions/{ts.MODEL_NAME}",
                    {"verify": str(certs / "ca.crt"), "cert": (str(client.cert), str(client.key))},
                ),
            }
            order = ["plain", "door"]
            for k in range(args.rounds):
                for label in order if k % 2 == 0 else order[::-1]:
                    url, session = paths[label]
                    procs = {"door": door_pids(workdir), "torchserve": replica_pids(Path(replica["workdir"]))}
                    before = {name: cpu_seconds(pids) for name, pids in procs.items()}
                    r = saturate(url, images, args.clients, args.seconds, **session)
                    # CPU per request (whole run, ramp included): what the door adds whatever else the machine runs.
                    sent = max(1, r["ok"] + r["failures"])
                    cpu = {f"cpu_ms_per_request_{n}": round(1000 * (cpu_seconds(p) - before[n]) / sent, 2)
                           for n, p in procs.items()}  # fmt: skip
                    runs.append({"round": k + 1, "path": label, **r, **cpu})
                    print(f"round {k + 1}, {label}: {r['rps']:.2f} req/s, p50 {r['p50_ms']} ms", flush=True)
            dropped = door.dropped_logs(workdir)
        finally:
            door.stop(workdir)
    med = {p: statistics.median(r["rps"] for r in runs if r["path"] == p) for p in ("plain", "door")}
    cost = 1 - med["door"] / med["plain"] if med["plain"] else None
    # The door's CPU per request against TorchServe's: its share of the CPU a request costs at saturation.
    door_runs = [r for r in runs if r["path"] == "door"]
    door_ms = statistics.median(r["cpu_ms_per_request_door"] for r in door_runs)
    ts_ms = statistics.median(r["cpu_ms_per_request_torchserve"] for r in runs)
    cpu_share = door_ms / (door_ms + ts_ms) if door_ms + ts_ms > 0 else None
    result = {
        "started": started,
        "config": {"rounds": args.rounds, "seconds": args.seconds, "clients": args.clients, "images": len(images)},
        "machine": {"cpus": os.cpu_count(), "loadavg_before": [round(x, 2) for x in load], "note": args.note},
        "runs": runs,
        "median_rps": {k: round(v, 3) for k, v in med.items()},
        "door_cost": None if cost is None else round(cost, 4),
        "cpu_ms_per_request": {"door": door_ms, "torchserve": ts_ms},
        "door_cpu_share": None if cpu_share is None else round(cpu_share, 4),
        "audit_lines_dropped": dropped,
        "limit": 0.10,
    }
    print(f"| path | median req/s |\n|---|---|\n| plain | {med['plain']:.2f} |\n| door (mTLS) | {med['door']:.2f} |")
    print(f"door cost: {100 * cost:.1f}% of served throughput (limit 10%)" if cost is not None else "no plain figure")
    write_result(args.json, result)
    return result
