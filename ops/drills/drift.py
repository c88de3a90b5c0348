"""The drift drill: val knees, then another hospital's, through the server with Prometheus watching.

``python -m ops.drills.drift [--val 300] [--out reports/drills/drift.json]`` (``make drill-drift``): when
`KneeInputDrift` went pending and firing, whether it stayed quiet on val knees, the drift score over time.
How it runs and what bounds it: docs/MONITORING.md ("The drill").
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import logging
import random
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from model.paths import KOA, ROOT, SITE2
from ops import monitor
from ops import server as ts
from ops.load import check_loopback
from ops.procs import free_ports
from ops.results import write_result

log = logging.getLogger(__name__)
ALERT = "KneeInputDrift"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)  # fmt: skip


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=KOA, help="its val/ knees first")
    p.add_argument("--site2", type=Path, default=SITE2, help="then these")
    p.add_argument("--val", type=int, default=300, help="val knees before the switch")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the alert after the last knee")
    p.add_argument("--workdir", type=Path, default=ts.DEFAULT_WORKDIR, help="the running server (make serve)")
    p.add_argument("--monitor-workdir", type=Path, default=monitor.DEFAULT_WORKDIR, help="make monitor's")
    p.add_argument("--store", type=Path, default=ROOT / "model_store", help="archive of a private server")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "drills" / "drift.json")
    p.add_argument("--screenshot", type=Path, default=None, help="PNG of Prometheus's graph at the end")
    p.add_argument("--seed", type=int, default=0)
    return p


@dataclass
class Progress:
    """Knees answered so far, by phase, and the alert's first sightings (shared with the polling thread)."""

    sent: dict[str, int] = field(default_factory=lambda: {"val": 0, "site2": 0})
    statuses: dict[str, dict[int, int]] = field(default_factory=lambda: {"val": {}, "site2": {}})
    switch_at: float | None = None
    seen: dict[str, dict[str, Any]] = field(default_factory=dict)  # pending/firing -> first time seen
    before_switch: list[str] = field(default_factory=list)  # alert states seen during the val knees
    lock: threading.Lock = field(default_factory=threading.Lock)


def knees(folder: Path, n: int | None, rng: random.Random) -> list[Path]:
    paths = sorted(p for g in range(5) for p in (folder / str(g)).glob("*.png"))
    if not paths:
        raise SystemExit(f"no PNG under {folder}/0..4")
    rng.shuffle(paths)
    return paths[:n] if n else paths


def send_all(url: str, key: str | None, paths: list[Path], phase: str, prog: Progress, concurrency: int) -> None:
    local = threading.local()

    def one(path: Path) -> None:
        if phase == "site2" and "firing" in prog.seen:  # the drill has its answer: the rest stay unsent
            return
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        headers = {"Content-Type": "image/png"} | ({"Authorization": f"Bearer {key}"} if key else {})
        try:
            status = session.post(url, data=path.read_bytes(), headers=headers, timeout=300).status_code
        except requests.RequestException:
            status = 0
        with prog.lock:
            prog.sent[phase] += 1
            prog.statuses[phase][status] = prog.statuses[phase].get(status, 0) + 1

    with cf.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, paths))


def poll_alerts(prometheus_url: str, prog: Progress, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        try:
            states = {a["state"] for a in monitor.alerts(prometheus_url) if a["labels"].get("alertname") == ALERT}
        except (OSError, ValueError, KeyError):
            continue
        now = time.time()
        with prog.lock:
            if prog.switch_at is None:
                prog.before_switch += sorted(states)
                continue
            for state in states:
                if state not in prog.seen:
                    prog.seen[state] = {
                        "site2_knees_answered": prog.sent["site2"],
                        "seconds_after_switch": round(now - prog.switch_at, 1),
                    }
                    log.info("%s %s: %s", ALERT, state, prog.seen[state])


def query_range(prometheus_url: str, expr: str, start: float, end: float, step: float = 5.0) -> list[list[float]]:
    q = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    data = requests.get(f"{prometheus_url}/api/v1/query_range?{q}", timeout=10).json()["data"]["result"]
    return [[round(float(t) - start, 1), round(float(v), 4)] for t, v in data[0]["values"]] if data else []


def screenshot(prometheus_url: str, out: Path, minutes: int) -> bool:
    """Prometheus's graph of the drift scores, rendered by headless Chromium into ``out``; False without Chromium."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        log.warning("chromium is not installed: no screenshot (sudo apt-get install -y chromium)")
        return False
    graph = urllib.parse.urlencode(
        {"g0.expr": "koa_drift_score", "g0.tab": "0", "g0.range_input": f"{minutes}m", "g0.stacked": "0"}
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="koa-chromium-") as profile:
        cmd = [
            chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1400,900",
            "--virtual-time-budget=15000", "--hide-scrollbars", f"--screenshot={out.resolve()}",
            f"{prometheus_url}/graph?{graph}",
        ]  # fmt: skip
        subprocess.run(cmd, capture_output=True, timeout=120)
    return out.is_file()


@contextlib.contextmanager
def servers(args: argparse.Namespace) -> Iterator[tuple[ts.Server, monitor.Monitor, bool]]:
    """The running server and monitoring, or private ones on free ports (stopped afterwards)."""
    if ts.is_running(args.workdir) and monitor.running(args.monitor_workdir):
        yield ts.attach(args.workdir), monitor.attach(args.monitor_workdir), False
        return
    with tempfile.TemporaryDirectory(prefix="koa-drill-drift-") as tmp:
        srv = ts.start_on_free_ports(args.store, Path(tmp) / "ts")
        try:
            prom, am, hook = free_ports(3)
            target = srv.metrics_url.removeprefix("http://")
            mon = monitor.start(Path(tmp) / "monitor", prom, am, hook, {"koa-serve": target})
            try:
                yield srv, mon, True
            finally:
                monitor.stop(mon.workdir)
        finally:
            ts.stop(Path(tmp) / "ts")


def main(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    val, site2 = knees(args.data / "val", args.val, rng), knees(args.site2, None, rng)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with servers(args) as (srv, mon, private):
        check_loopback(srv.inference_url)  # a drill never sends knees to another machine
        url = f"{srv.inference_url}/predictions/{ts.MODEL_NAME}"
        key = srv.keys().get("inference")
        prog, stop = Progress(), threading.Event()
        poller = threading.Thread(target=poll_alerts, args=(mon.prometheus_url, prog, stop), daemon=True)
        t0 = time.time()
        poller.start()
        log.info("%d val knees, then %d of the second hospital, to %s", len(val), len(site2), url)
        send_all(url, key, val, "val", prog, args.concurrency)
        if not prog.statuses["val"].get(200):
            raise SystemExit(f"no val knee was answered by {url}: {prog.statuses['val']} (HTTP status: count)")
        time.sleep(15)  # the last val scrapes and evaluations: quiet means quiet with the window full of val
        with prog.lock:
            prog.switch_at = time.time()
        send_all(url, key, site2, "site2", prog, args.concurrency)
        t_last = time.time()
        while "firing" not in prog.seen and time.time() - t_last < args.wait:
            time.sleep(1)
        time.sleep(15)  # Alertmanager's group_wait: the webhook gets the firing alert
        stop.set()
        poller.join()
        t_end = time.time()
        minutes = int((t_end - t0) / 60) + 2
        shot = screenshot(mon.prometheus_url, args.screenshot, minutes) if args.screenshot else False
        threshold = monitor.query(mon.prometheus_url, "koa_drift_threshold")
        result = {
            "alert": ALERT,
            "threshold": float(threshold[0]["value"][1]) if threshold else None,
            "val_knees": len(val),
            "site2_knees": prog.sent["site2"],
            "site2_knees_available": len(site2),
            "answers": prog.statuses,
            "quiet_before_switch": not prog.before_switch,
            "states_before_switch": sorted(set(prog.before_switch)),
            "pending": prog.seen.get("pending"),
            "firing": prog.seen.get("firing"),
            "seconds_val": round(prog.switch_at - t0, 1),
            "seconds_site2": round(t_last - prog.switch_at, 1),
            "overall_score": query_range(mon.prometheus_url, 'koa_drift_score{feature="overall"}', t0, t_end),
            "refused_score": query_range(mon.prometheus_url, 'koa_drift_score{feature="refused"}', t0, t_end),
            "switch_at_s": round(prog.switch_at - t0, 1),
            "private_servers": private,
            "screenshot": str(args.screenshot) if shot else None,
            "webhook_alerts": [],
        }
        if mon.alerts_log.is_file():
            lines = [json.loads(x) for x in mon.alerts_log.read_text().splitlines() if x.strip()]
            result["webhook_alerts"] = [{k: a[k] for k in ("alertname", "status", "startsAt")} for a in lines]
    write_result(args.out, result)
    log.info("drift drill -> %s: quiet before %s, firing %s", args.out, result["quiet_before_switch"], result["firing"])
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    main(get_args_parser().parse_args())
