"""Start and stop Prometheus, Alertmanager and the project's alert webhook, all on loopback.

``python -m ops.monitor start|stop|status|alerts [--workdir logs/monitor]`` (``make monitor``,
``make monitor-stop``); ``python -m ops.monitor webhook --port P --log FILE`` is the receiver itself.
Debian's packages run the configuration of deploy/monitoring/; ports, targets and where alerts go:
docs/MONITORING.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from model.paths import ROOT
from ops.procs import is_alive, stop_pid

__all__ = [
    "Monitor", "MonitorError", "start", "stop", "attach", "query", "alerts", "render_prometheus",
    "render_alertmanager", "serve_webhook", "CONFIG_DIR", "DEFAULT_WORKDIR", "DEFAULT_TARGETS",
]  # fmt: skip

log = logging.getLogger(__name__)
CONFIG_DIR = ROOT / "deploy" / "monitoring"
DEFAULT_WORKDIR = ROOT / "logs" / "monitor"
# scrape job -> target of `make serve`, `make pacs` and `make cluster`
DEFAULT_TARGETS = {"koa-serve": "127.0.0.1:8082", "koa-gateway": "127.0.0.1:9464", "koa-haproxy": "127.0.0.1:8190"}
PROCESSES = ("webhook", "alertmanager", "prometheus")  # started in this order, stopped in reverse


class MonitorError(RuntimeError):
    """Prometheus, Alertmanager or the webhook did not come up (or is missing); the message says why."""


@dataclass
class Monitor:
    workdir: Path
    prometheus_port: int
    alertmanager_port: int
    webhook_port: int
    targets: dict[str, str]
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    @property
    def alertmanager_url(self) -> str:
        return f"http://127.0.0.1:{self.alertmanager_port}"

    @property
    def alerts_log(self) -> Path:
        return self.workdir / "alerts.jsonl"


def binary(name: str) -> str:
    """The path of a Debian binary (prometheus, prometheus-alertmanager, promtool); MonitorError without it."""
    found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").is_file() else None)
    if found is None:
        raise MonitorError(f"{name} is not installed: sudo apt-get install -y prometheus prometheus-alertmanager")
    return found


def render_prometheus(targets: dict[str, str], alertmanager_port: int, rules: Path) -> str:
    """deploy/monitoring/prometheus.yml with ``targets`` ({job: host:port}; jobs not listed are left out),
    the Alertmanager's port and the absolute path of the rules."""
    cfg = yaml.safe_load((CONFIG_DIR / "prometheus.yml").read_text())
    cfg["rule_files"] = [str(rules)]
    cfg["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{alertmanager_port}"]
    jobs = []
    for job in cfg["scrape_configs"]:
        if job["job_name"] in targets:
            job["static_configs"][0]["targets"] = [targets[job["job_name"]]]
            jobs.append(job)
    cfg["scrape_configs"] = jobs
    return yaml.safe_dump(cfg, sort_keys=False)


def render_alertmanager(webhook_port: int) -> str:
    """deploy/monitoring/alertmanager.yml with the webhook receiver on ``webhook_port``."""
    cfg = yaml.safe_load((CONFIG_DIR / "alertmanager.yml").read_text())
    cfg["receivers"][0]["webhook_configs"][0]["url"] = f"http://127.0.0.1:{webhook_port}/alerts"
    return yaml.safe_dump(cfg, sort_keys=False)


def _spawn(workdir: Path, name: str, cmd: list[str]) -> int:
    # from the repository root: the webhook runs as `python -m ops.monitor`
    with open(workdir / f"{name}.log", "w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    return proc.pid


def _wait_ready(url: str, pid: int, name: str, workdir: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_alive(pid):
            tail = (workdir / f"{name}.log").read_text(errors="replace")[-1500:]
            raise MonitorError(f"{name} exited during start-up. Log:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise MonitorError(f"{name} was not ready at {url} within {timeout:.0f} s (log: {workdir / f'{name}.log'})")


def start(
    workdir: Path = DEFAULT_WORKDIR,
    prometheus_port: int = 9090,
    alertmanager_port: int = 9093,
    webhook_port: int = 9095,
    targets: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> Monitor:
    """Start the webhook, Alertmanager and Prometheus from ``workdir``; return once each answers.

    Raises:
        MonitorError: a binary is missing, one is already running from ``workdir``, or one failed to start.
    """
    workdir = Path(workdir).resolve()
    if running(workdir):
        raise MonitorError(f"monitoring already runs from {workdir}: `make monitor-stop` first")
    prometheus, alertmanager = binary("prometheus"), binary("prometheus-alertmanager")
    workdir.mkdir(parents=True, exist_ok=True)
    rules = workdir / "alerts.yml"
    shutil.copyfile(CONFIG_DIR / "alerts.yml", rules)
    mon = Monitor(workdir, prometheus_port, alertmanager_port, webhook_port, dict(targets or DEFAULT_TARGETS))
    (workdir / "prometheus.yml").write_text(render_prometheus(mon.targets, alertmanager_port, rules))
    (workdir / "alertmanager.yml").write_text(render_alertmanager(webhook_port))
    cmds = {
        "webhook": [
            sys.executable,
            "-m",
            "ops.monitor",
            "webhook",
            "--port",
            str(webhook_port),
            "--log",
            str(mon.alerts_log),
        ],
        "alertmanager": [
            alertmanager,
            f"--config.file={workdir / 'alertmanager.yml'}",
            f"--storage.path={workdir / 'alertmanager'}",
            f"--web.listen-address=127.0.0.1:{alertmanager_port}",
            "--cluster.listen-address=",  # no gossip port: one Alertmanager, on loopback only
        ],
        "prometheus": [
            prometheus,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            "--storage.tsdb.retention.time=2d",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
        ],
    }
    ready = {
        "webhook": f"http://127.0.0.1:{webhook_port}/healthy",
        "alertmanager": f"{mon.alertmanager_url}/-/ready",
        "prometheus": f"{mon.prometheus_url}/-/ready",
    }
    try:
        for name in PROCESSES:
            mon.pids[name] = _spawn(workdir, name, cmds[name])
            _save(mon)
            _wait_ready(ready[name], mon.pids[name], name, workdir, timeout)
    except BaseException:
        stop(workdir)
        raise
    log.info("Prometheus %s, Alertmanager %s, alerts -> %s", mon.prometheus_url, mon.alertmanager_url, mon.alerts_log)
    return mon


def _save(mon: Monitor) -> None:
    state = asdict(mon) | {"workdir": str(mon.workdir)}
    (mon.workdir / "state.json").write_text(json.dumps(state, indent=1))


def attach(workdir: Path = DEFAULT_WORKDIR) -> Monitor:
    """The monitoring running from ``workdir``; MonitorError when none is."""
    workdir = Path(workdir).resolve()
    if not running(workdir):
        raise MonitorError(f"no monitoring runs from {workdir} (`make monitor`)")
    state = json.loads((workdir / "state.json").read_text())
    return Monitor(**(state | {"workdir": workdir}))


def running(workdir: Path) -> bool:
    path = Path(workdir) / "state.json"
    if not path.is_file():
        return False
    pids = json.loads(path.read_text()).get("pids", {})
    return any(is_alive(pid) for pid in pids.values())


def stop(workdir: Path = DEFAULT_WORKDIR, timeout: float = 20.0) -> bool:
    """Stop what runs from ``workdir`` (Prometheus first, the webhook last); True if something was stopped."""
    path = Path(workdir).resolve() / "state.json"
    if not path.is_file():
        return False
    pids = json.loads(path.read_text()).get("pids", {})
    stopped = False
    for name in reversed(PROCESSES):
        stopped = stop_pid(pids.get(name), timeout) or stopped
    return stopped


def _get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def query(prometheus_url: str, expr: str) -> list[dict[str, Any]]:
    """The instant vector of ``expr`` (Prometheus's ``/api/v1/query``): [{"metric": {...}, "value": [t, "v"]}]."""
    data = _get_json(f"{prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    return data["data"]["result"]


def alerts(prometheus_url: str) -> list[dict[str, Any]]:
    """Prometheus's pending and firing alerts (``/api/v1/alerts``)."""
    return _get_json(f"{prometheus_url}/api/v1/alerts")["data"]["alerts"]


class _WebhookHandler(BaseHTTPRequestHandler):
    log_path: Path

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self._reply(200 if self.path == "/healthy" else 404, b"ok\n" if self.path == "/healthy" else b"")

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/alerts":
            self._reply(404, b"")
            return
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        except (ValueError, json.JSONDecodeError):
            self._reply(400, b"not JSON\n")
            return
        received = time.time()
        with open(self.log_path, "a") as f:
            for a in body.get("alerts", []):
                line = {
                    "received": received,
                    "status": a.get("status"),
                    "alertname": a.get("labels", {}).get("alertname"),
                    "labels": a.get("labels", {}),
                    "startsAt": a.get("startsAt"),
                    "summary": a.get("annotations", {}).get("summary"),
                }
                f.write(json.dumps(line) + "\n")
                log.warning("alert %s %s: %s", line["alertname"], line["status"], line["summary"])
        self._reply(200, b"ok\n")

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:  # alerts are logged above; access lines are noise
        pass


def serve_webhook(port: int, log_path: Path) -> ThreadingHTTPServer:
    """The alert receiver on 127.0.0.1:``port``: Alertmanager's webhook JSON -> one line per alert in ``log_path``."""
    handler = type("WebhookHandler", (_WebhookHandler,), {"log_path": Path(log_path)})
    return ThreadingHTTPServer(("127.0.0.1", port), handler)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ops.monitor", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start", help="start the webhook, Alertmanager and Prometheus")
    s.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    s.add_argument("--prometheus-port", type=int, default=9090)
    s.add_argument("--alertmanager-port", type=int, default=9093)
    s.add_argument("--webhook-port", type=int, default=9095)
    s.add_argument(
        "--target", action="append", default=None, metavar="JOB=HOST:PORT",
        help=f"scrape target (repeat; default {DEFAULT_TARGETS})",
    )  # fmt: skip
    for name in ("stop", "status", "alerts"):
        sub.add_parser(name).add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    w = sub.add_parser("webhook", help="run the alert receiver in the foreground")
    w.add_argument("--port", type=int, default=9095)
    w.add_argument("--log", type=Path, default=DEFAULT_WORKDIR / "alerts.jsonl")
    return p


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "start":
        targets = dict(t.split("=", 1) for t in args.target) if args.target else None
        mon = start(args.workdir, args.prometheus_port, args.alertmanager_port, args.webhook_port, targets)
        print(f"Prometheus {mon.prometheus_url}  Alertmanager {mon.alertmanager_url}  alerts -> {mon.alerts_log}")
    elif args.command == "stop":
        print("stopped" if stop(args.workdir) else "nothing was running")
    elif args.command == "status":
        print(json.dumps(asdict(attach(args.workdir)), default=str, indent=1))
    elif args.command == "alerts":
        print(json.dumps(alerts(attach(args.workdir).prometheus_url), indent=1))
    else:
        server = serve_webhook(args.port, args.log)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        log.info("alert webhook on 127.0.0.1:%d, logging to %s", args.port, args.log)
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
