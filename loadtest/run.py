"""Headless Locust load test of KOA-Serve, REST and gRPC measured one after the other.

``python -m loadtest.run [--users 4] [--rate 2] [--duration 30s] [--protocols rest,grpc] [--start]
[--workdir logs/serve] [--host URL --grpc-target HOST:PORT] [--explain-share 0.0] [--images DIR]
[--out reports/loadtest]`` (``make loadtest``): one Locust subprocess per protocol (gevent's patching stays
out of this process) against ``make serve``'s server or a private one. Targets, outputs and exit status:
docs/BENCHMARKS.md ("Load tests").
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from koa_client import KOAClientError
from koa_client.grpc_client import GrpcClient
from koa_client.rest import RestClient
from koa_client.settings import TOKEN
from loadtest import settings
from ops import server as ts
from ops.checkout import ROOT
from ops.load import check_loopback, load_images

log = logging.getLogger("loadtest.run")

LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
PROTOCOLS = ("rest", "grpc")
DURATION_RE = re.compile(r"^(\d+h)?(\d+m)?(\d+s?)?$")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=4, help="concurrent Locust users per protocol")
    p.add_argument("--rate", type=float, default=2, help="users started per second")
    p.add_argument("--duration", default="30s", help="run time per protocol, Locust syntax (30s, 2m, 1h30m)")
    p.add_argument("--protocols", default="rest,grpc", help="comma-separated subset of rest,grpc")
    p.add_argument("--start", action="store_true", help="always start a private server (on free ports)")
    p.add_argument("--workdir", type=Path, default=ts.DEFAULT_WORKDIR, help="where the running server lives")
    p.add_argument("--host", default=None, help="REST address of a running server (instead of --workdir's)")
    p.add_argument("--grpc-target", default=None, help="gRPC host:port of a running server (with --host)")
    p.add_argument("--key-file", type=Path, default=None, help="key_file.json (default: --workdir's)")
    p.add_argument("--token", default=None, help="inference key (default: KOA_TOKEN with --host, else the key file)")
    tls = p.add_argument_group("TLS: the secure front door (--host https://..., --grpc-target grpcs://...)")
    tls.add_argument("--ca", type=Path, default=None, help="PEM CA that signed the door's certificate")
    tls.add_argument("--cert", type=Path, default=None, help="this load generator's client certificate (no token then)")
    tls.add_argument("--key", type=Path, default=None, help="the key of --cert (default: in the same file)")
    p.add_argument("--explain-share", type=float, default=0.0, help="share of requests that ask for an explanation")
    p.add_argument(
        "--user-rate",
        type=float,
        default=0.0,
        help="open loop: requests/s per user (0: closed loop, each user sends as soon as it has an answer)",
    )
    p.add_argument("--images", type=Path, default=ROOT / "tests" / "fixtures", help="folder of request images")
    p.add_argument("--model-store", type=Path, default=ROOT / "model_store", help="archives, for --start")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "loadtest", help="reports go to OUT/<timestamp>")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured requests per protocol before the runs")
    p.add_argument("--stop-timeout", type=float, default=30, help="seconds users get to finish at the end")
    p.add_argument("--loglevel", default="WARNING", help="Locust's log level (its log goes to <protocol>.log)")
    return p


def check_args(args: argparse.Namespace) -> list[str]:
    """Validate the options; returns the protocols to run.

    Raises:
        ValueError: a bad value, or a non-loopback target.
    """
    protocols = [p.strip().lower() for p in args.protocols.split(",") if p.strip()]
    if not protocols or set(protocols) - set(PROTOCOLS):
        raise ValueError(
            f"--protocols must be a comma-separated subset of {','.join(PROTOCOLS)}, got {args.protocols!r}"
        )
    if args.users < 1 or args.rate <= 0:
        raise ValueError(f"--users must be >= 1 and --rate > 0, got {args.users} and {args.rate}")
    if not DURATION_RE.match(args.duration) or not re.search(r"[1-9]", args.duration):
        raise ValueError(f"--duration must be a positive Locust time such as 30s, 2m or 1h30m, got {args.duration!r}")
    if not 0 <= args.explain_share <= 1:
        raise ValueError(f"--explain-share must be in [0, 1], got {args.explain_share}")
    if args.user_rate < 0:
        raise ValueError(f"--user-rate must be >= 0, got {args.user_rate}")
    if args.grpc_target and not args.host:
        raise ValueError("--grpc-target needs --host (the REST address of the same server)")
    for address in (args.host, args.grpc_target):
        if address:
            check_loopback(address)
    return list(dict.fromkeys(protocols))


def workdir_target(workdir: Path) -> tuple[str, str]:
    """(REST URL, gRPC host:port) of the server started from ``workdir``.

    A private server (`ops.server.start_on_free_ports`) keeps its rendered config in its workdir;
    ``make serve`` uses the repository's ``config.properties``.
    """
    props = ts.workdir_config(workdir)
    host = props.get("grpc_inference_address", "127.0.0.1")
    return props["inference_address"], f"{host}:{props.get('grpc_inference_port', '7070')}"


@contextlib.contextmanager
def target_server(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """The server to load: running (per the options) or a private one, stopped on exit."""
    if args.host and not args.start:
        yield {
            "host": args.host,
            "grpc_target": args.grpc_target or "127.0.0.1:7070",
            "key_file": args.key_file or args.workdir / "key_file.json",
            "started": False,
        }
        return
    if not args.start and ts.is_running(args.workdir):
        host, grpc_target = workdir_target(args.workdir)
        key_file = args.key_file or args.workdir / "key_file.json"
        yield {"host": host, "grpc_target": grpc_target, "key_file": key_file, "started": False}
        return
    if not args.start:
        log.warning("no server running from %s: starting a private one", args.workdir)
    with tempfile.TemporaryDirectory(prefix="koa-loadtest-") as tmp:
        workdir = Path(tmp)
        try:
            server = ts.start_on_free_ports(args.model_store, workdir)
            log.warning("private server: %s, gRPC 127.0.0.1:%d", server.inference_url, server.grpc_port)
            yield {
                "host": server.inference_url,
                "grpc_target": f"127.0.0.1:{server.grpc_port}",
                "key_file": workdir / "key_file.json",
                "started": True,
            }
        finally:
            ts.stop(workdir)


def run_dir(out: Path) -> Path:
    """A new ``out/<timestamp>`` folder (a suffix when two runs start in the same second)."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(100):
        path = out / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"cannot make a new run folder under {out}")


def point_latest(run: Path) -> Path:
    """Make ``run.parent/latest`` a relative symlink to ``run``, replaced atomically."""
    latest = run.parent / "latest"
    tmp = run.parent / f".latest-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run.name)
    os.replace(tmp, latest)
    return latest


def locust_command(protocol: str, target: dict[str, Any], args: argparse.Namespace, run: Path) -> list[str]:
    exe = Path(sys.executable).parent / "locust"
    head = [str(exe)] if exe.is_file() else [sys.executable, "-m", "locust"]
    return [
        *head,
        "-f", str(LOCUSTFILE),
        "--headless",
        "--users", str(args.users),
        "--spawn-rate", str(args.rate),
        "--run-time", args.duration,
        "--stop-timeout", str(args.stop_timeout),
        "--host", target["host"],
        "--csv", str(run / protocol),
        "--html", str(run / f"{protocol}.html"),
        "--only-summary",
        "--loglevel", args.loglevel,
    ]  # fmt: skip


def locust_env(protocol: str, target: dict[str, Any], args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            settings.USERS.name: protocol,
            settings.GRPC_TARGET.name: target["grpc_target"],
            settings.EXPLAIN_SHARE.name: str(args.explain_share),
            settings.USER_RATE.name: str(args.user_rate),
            settings.IMAGES.name: str(args.images.resolve()),
        }
    )
    tls = ((settings.CA_FILE, args.ca), (settings.CERT_FILE, args.cert), (settings.CERT_KEY_FILE, args.key))
    for setting, path in tls:
        if path is not None:
            env[setting.name] = str(Path(path).resolve())
    # The key of the server under test wins over a KOA_TOKEN left in the shell, except when the
    # caller named the server (--host) and so may hold its key in KOA_TOKEN.
    if args.token:
        env[TOKEN.name] = args.token
    elif target["started"] or not args.host:
        env.pop(TOKEN.name, None)
    env[settings.KEY_FILE.name] = str(Path(target["key_file"]).resolve())
    return env


def warm_up(target: dict[str, Any], args: argparse.Namespace, protocols: list[str]) -> None:
    """A few unmeasured requests per protocol first: a fresh TorchScript model is slow on its first
    calls, and without this the protocol measured first would carry that cost alone."""
    if args.warmup <= 0:
        return
    env = locust_env("rest", target, args)
    try:
        if args.cert is not None and not env.get(TOKEN.name):
            token = ""  # behind the door: the certificate is the credential
        else:
            token = env.get(TOKEN.name) or json.loads(Path(env[settings.KEY_FILE.name]).read_text())["inference"]["key"]
        image = load_images(args.images)[0].data
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        log.warning("no warm-up (%s): Locust will report the problem", exc)
        return
    tls = {"ca_file": args.ca, "cert_file": args.cert, "cert_key_file": args.key}
    for protocol in protocols:
        if protocol == "rest":
            client: Any = RestClient(target["host"], token=token or None, timeout=120, **tls)
        else:
            client = GrpcClient(target["grpc_target"], token=token or None, timeout=120, **tls)
        try:
            for i in range(args.warmup):
                client.predict(image, explain=args.explain_share > 0 and i == 0)
        except KOAClientError as exc:
            log.warning("%s warm-up request failed: %s", protocol, exc)
        finally:
            client.close()


def _number(value: str) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):  # "N/A" when nothing was measured
        return None


def exact_percentiles(times_ms: list[float]) -> dict[str, float]:
    """Nearest-rank p50 / p95 / p99 (the smallest time at or below which that share of requests fall)."""
    ordered = sorted(times_ms)
    return {f"p{q}_ms": ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] for q in (50, 95, 99)}


def read_latencies(path: Path) -> list[float] | None:
    """The request times the locustfile wrote (KOA_LATENCY_FILE), or None when there are none."""
    try:
        times = [float(line) for line in path.read_text().split()]
    except (OSError, ValueError):
        return None
    return times or None


def protocol_summary(run: Path, protocol: str) -> dict[str, Any]:
    """The Aggregated row of ``<protocol>_stats.csv`` (plus each request name and the failure reasons).

    p50 / p95 / p99 come from every request's time (``<protocol>_latencies.txt``) where the locustfile
    wrote them (``"percentiles": "exact"``): Locust's CSV rounds times above 100 ms to two significant
    digits, too coarse to tell 1.9 x p50 from 2.1 x p50. Otherwise they are Locust's (``"locust"``).
    """
    stats = run / f"{protocol}_stats.csv"
    if not stats.is_file():
        return {"requests": 0, "failures": 0, "error": f"Locust wrote no {stats.name}: see {protocol}.log"}

    def row_summary(row: dict[str, str]) -> dict[str, Any]:
        return {
            "requests": int(row["Request Count"]),
            "failures": int(row["Failure Count"]),
            "requests_per_s": _number(row["Requests/s"]),
            "p50_ms": _number(row["50%"]),
            "p95_ms": _number(row["95%"]),
            "p99_ms": _number(row["99%"]),
            "mean_ms": _number(row["Average Response Time"]),
            "max_ms": _number(row["Max Response Time"]),
        }

    with open(stats, newline="") as f:
        rows = list(csv.DictReader(f))
    total = next((r for r in rows if r["Name"] == "Aggregated"), None)
    out = row_summary(total) if total else {"requests": 0, "failures": 0}
    out["by_name"] = {r["Name"]: row_summary(r) for r in rows if r["Name"] != "Aggregated"}
    times = read_latencies(run / f"{protocol}_latencies.txt")
    out["percentiles"] = "exact" if times else "locust"
    if times:
        out.update(exact_percentiles(times))
    failures = run / f"{protocol}_failures.csv"
    reasons: dict[str, int] = {}
    if failures.is_file():
        with open(failures, newline="") as f:
            for r in csv.DictReader(f):
                # Locust writes repr(error), e.g. CatchResponseError('503: ...'): keep the message.
                wrapped = re.fullmatch(r"\w+\((['\"])(.*)\1\)", r["Error"], flags=re.S)
                key = f"{r['Name']}: {wrapped.group(2) if wrapped else r['Error']}"
                reasons[key] = reasons.get(key, 0) + int(r["Occurrences"])
    out["failure_reasons"] = reasons
    return out


def run_locust(protocol: str, target: dict[str, Any], args: argparse.Namespace, run: Path) -> dict[str, Any]:
    """One headless Locust run of ``protocol``'s user class; its summary (with Locust's exit status)."""
    cmd = locust_command(protocol, target, args, run)
    logfile = run / f"{protocol}.log"
    log.warning(
        "%s: %d users for %s against %s",
        protocol,
        args.users,
        args.duration,
        target["host"] if protocol == "rest" else target["grpc_target"],
    )
    env = {**locust_env(protocol, target, args), settings.LATENCY_FILE.name: str(run / f"{protocol}_latencies.txt")}
    with open(logfile, "w") as sink:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=sink, stderr=sink).returncode
    summary = protocol_summary(run, protocol)
    summary["locust_exit_code"] = code
    if code not in (0, 1) or "error" in summary:  # 1: some request failed; anything else: Locust itself
        tail = logfile.read_text(errors="replace").strip().splitlines()[-15:]
        log.error("Locust (%s) exited with %d:\n%s", protocol, code, "\n".join(tail))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"{'':6} {'requests':>9} {'failures':>9} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"]
    for protocol in PROTOCOLS:
        s = summary.get(protocol)
        if s is None:
            continue

        def f(key: str, fmt: str = ".0f", s: dict[str, Any] = s) -> str:
            return "n/a" if s.get(key) is None else format(s[key], fmt)

        lines.append(
            f"{protocol:6} {s['requests']:>9} {s['failures']:>9} {f('requests_per_s', '.2f'):>7} "
            f"{f('p50_ms'):>8} {f('p95_ms'):>8} {f('p99_ms'):>8}"
        )
        for reason, count in list(s.get("failure_reasons", {}).items())[:5]:
            lines.append(f"       {count} x {reason}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    try:
        protocols = check_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run = run_dir(args.out)
    summary: dict[str, Any] = {}
    try:
        with target_server(args) as target:
            check_loopback(target["host"])
            check_loopback(target["grpc_target"])
            summary["config"] = {
                "users": args.users,
                "spawn_rate": args.rate,
                "duration_per_protocol": args.duration,
                "protocols": protocols,
                "host": target["host"],
                "grpc_target": target["grpc_target"],
                "private_server": target["started"],
                "explain_share": args.explain_share,
                "user_rate": args.user_rate,
                "warmup_requests_per_protocol": args.warmup,
                "images": str(args.images),
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
            }
            warm_up(target, args, protocols)
            for protocol in protocols:
                summary[protocol] = run_locust(protocol, target, args, run)
    except (ts.ServeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        summary["error"] = str(exc)
    (run / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    latest = point_latest(run)
    if "error" in summary:
        return 1
    print(format_summary(summary))
    print(f"reports: {latest} -> {run}")
    bad = [
        p for p in protocols if summary[p]["failures"] or not summary[p]["requests"] or summary[p]["locust_exit_code"]
    ]
    if bad:
        print(f"FAILED: {', '.join(bad)} had failed requests or none at all (see summary.json)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="loadtest: %(message)s")
    sys.exit(main(get_args_parser().parse_args()))
