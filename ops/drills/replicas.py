"""Replica drill: Locust through the balancer while one replica's server is killed and started again.

``python -m ops.drills.replicas [--replicas 2] [--seconds 90] [--kill-at 20] [--down-s 5] [--users 8]
[--retry-s 60] [--throughput-s 40] [--json reports/drills/replicas.json]`` (``make drill-replicas``):
throughput of 1 and N replicas behind `ops.cluster`, then replica r0 SIGKILLed under load and started
again. Its figures, what each means and the exit status: docs/DEPLOY.md ("The replica drill").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from koa_client import load_token
from koa_client.rest import RestClient
from loadtest import settings
from ops import cluster
from ops import server as ts
from ops.drills.common import ROOT, publish
from ops.load import load_images
from ops.procs import is_alive, read_pid
from ops.results import DOC_RESULTS, write_result

LOCUSTFILE = Path(__file__).with_name("replicas_locustfile.py")
DEFAULT_JSON = ROOT / "reports" / "drills" / "replicas.json"
DEFAULT_WORKDIR = ROOT / "logs" / "drill-replicas"
PUBLISHED = DOC_RESULTS / "drill_replicas.json"  # the committed copy docs/DEPLOY.md is rendered from


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--seconds", type=float, default=90.0, help="drill load duration")
    p.add_argument("--kill-at", type=float, default=20.0, help="seconds after the load starts")
    p.add_argument("--down-s", type=float, default=5.0, help="seconds the killed replica stays down")
    p.add_argument("--users", type=int, default=8, help="drill users (closed loop), half REST, half gRPC")
    p.add_argument("--retry-s", type=float, default=60.0, help="the clients' retry window")
    p.add_argument("--throughput-s", type=float, default=40.0, help="seconds per throughput run; 0 skips them")
    p.add_argument("--throughput-users", type=int, default=32, help="closed-loop users of the throughput runs")
    p.add_argument("--warmup-s", type=float, default=15.0, help="unmeasured load before each throughput run")
    p.add_argument(
        "--rounds", type=int, default=1, help="throughput rounds, 1 then N replicas in each (a shared machine drifts)"
    )
    p.add_argument(
        "--configs",
        default="",
        help="throughput runs as REPLICASxTHREADS, comma-separated (e.g. 1x2,1x1,2x1); default: 1 and --replicas "
        "replicas, the cores shared out",
    )
    p.add_argument("--images", type=Path, default=ROOT / "tests" / "fixtures")
    p.add_argument("--model-store", type=Path, default=ROOT / "model_store")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    p.add_argument(
        "--publish", type=Path, default=PUBLISHED, help="copy the result here, render the docs ('': neither)"
    )
    return p


@dataclass(frozen=True)
class ReplicaConfig:
    """One throughput configuration: replicas, and torch threads per worker (None: the cores shared out)."""

    replicas: int
    threads: int | None = None


def parse_configs(text: str) -> list[ReplicaConfig]:
    """``"1x2,2x1"`` -> [ReplicaConfig(1, 2), ReplicaConfig(2, 1)]: replicas and torch threads per worker;
    ``"2"`` -> [ReplicaConfig(2, None)].

    Raises:
        ValueError: anything else, saying what was given.
    """
    out: list[ReplicaConfig] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        n, _, t = part.partition("x")
        if not n.isdigit() or int(n) < 1 or (t and (not t.isdigit() or int(t) < 1)):
            raise ValueError(f"--configs: {part!r} is not REPLICAS or REPLICASxTHREADS (e.g. 2x1)")
        out.append(ReplicaConfig(int(n), int(t) if t else None))
    return out


def free_front() -> cluster.Front:
    rest, grpc_port, health = ts.free_ports(3)
    return cluster.Front(rest_port=rest, grpc_port=grpc_port, health_port=health)


def locust(
    front: cluster.Front,
    workdir: Path,
    users: int,
    seconds: float,
    out: Path,
    images: Path,
    retry_s: float,
    reference: Path | None = None,
) -> subprocess.Popen:
    """Start headless Locust with the drill's users against the balancer; records go to ``out``/records.jsonl."""
    out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        settings.DRILL_GRPC_TARGET.name: f"127.0.0.1:{front.grpc_port}",
        settings.KEY_FILE.name: str(Path(workdir) / cluster.KEY_FILE),
        settings.IMAGES.name: str(images),
        settings.DRILL_REFERENCE.name: str(reference or ""),
        settings.DRILL_RECORDS.name: str(out / "records.jsonl"),
        settings.RETRY_S.name: str(retry_s),
        "PYTHONPATH": str(ROOT),
    }
    cmd = [
        str(Path(sys.executable).parent / "locust"), "-f", str(LOCUSTFILE), "--headless",
        "-u", str(users), "-r", str(users), "-t", f"{int(seconds)}s", "--stop-timeout", "30",
        "--host", f"http://127.0.0.1:{front.rest_port}", "--only-summary", "--loglevel", "WARNING",
        "--csv", str(out / "locust"),
    ]  # fmt: skip
    log = open(out / "locust.log", "w")  # noqa: SIM115 (closed with the process: Locust writes until it exits)
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def wait_locust(proc: subprocess.Popen, out: Path, timeout: float) -> list[dict[str, Any]]:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"Locust did not finish in {timeout:.0f} s; see {out / 'locust.log'}") from None
    records = out / "records.jsonl"
    if not records.is_file():
        raise RuntimeError(f"Locust wrote no records ({proc.returncode}); see {out / 'locust.log'}")
    return [json.loads(line) for line in records.read_text().splitlines() if line.strip()]


def reference_answers(front: cluster.Front, workdir: Path, images: Path) -> dict[str, dict[str, Any]]:
    """The answer for every image, taken through the balancer before any fault (sent again to check it)."""
    token = load_token(key_file=Path(workdir) / cluster.KEY_FILE)
    refs = {}
    with RestClient(f"http://127.0.0.1:{front.rest_port}", token=token, retry_s=30) as c:
        for image in load_images(images):
            answer = c.predict(image.data)
            refs[image.name] = {"kl_grade": answer["kl_grade"], "probabilities": answer["probabilities"]}
    return refs


def rate(records: list[dict[str, Any]], t0: float, t1: float) -> float | None:
    """Answered requests per second among those that ended in [t0, t1)."""
    if t1 - t0 <= 0:
        return None
    return sum(1 for r in records if r["ok"] and t0 <= r["end"] < t1) / (t1 - t0)


def longest_gap(records: list[dict[str, Any]], t0: float, t1: float) -> float:
    """The longest stretch in [t0, t1] in which no request was answered."""
    ends = sorted(r["end"] for r in records if r["ok"] and t0 <= r["end"] <= t1)
    points = [t0, *ends, t1]
    return max(b - a for a, b in zip(points, points[1:]))


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    lost = [r for r in records if not r["ok"]]
    out: dict[str, Any] = {
        "requests": len(records),
        "failures": sum(len(r["retried"]) for r in records) + len(lost),
        "resent": sum(1 for r in records if r["ok"] and r["retried"]),
        "lost": len(lost),
        "wrong": sum(1 for r in records if r["wrong"]),
    }
    kinds: dict[str, int] = {}
    for r in records:
        for label in r["retried"]:
            kinds[label] = kinds.get(label, 0) + 1
    out["failed_attempts_by_kind"] = kinds
    out["lost_errors"] = sorted({r["error"] for r in lost})[:10]
    return out


class CpuShare:
    """Who used the cores during a run: the cluster (Java, workers, HAProxy), the load generator, others.

    These machines are shared: a number measured while another job computes is not the cluster's
    own. The machine's busy time comes from ``/proc/stat`` (psutil), the cluster's from its processes,
    Locust's from the children this process has waited for; ``other_cores`` is what is left.
    """

    def __init__(self, workdir: Path) -> None:
        import psutil

        self.psutil, self.workdir = psutil, Path(workdir)

    def _pids(self) -> list[int]:
        state = cluster.load_state(self.workdir) or {"replicas": []}
        pids = [read_pid(self.workdir / "haproxy.pid")]
        for r in cluster.replicas_of(state):
            java = ts.server_pid(Path(r.workdir))
            pids += [java, *ts.descendants(java)] if java else []
        return [p for p in pids if p is not None and is_alive(p)]

    def _busy(self) -> float:
        t = self.psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    def _cluster(self) -> dict[int, float]:
        """{pid: CPU seconds so far} of the cluster's processes (a replica started again has new ones)."""
        out = {}
        for pid in self._pids():
            try:
                c = self.psutil.Process(pid).cpu_times()
                out[pid] = c.user + c.system
            except self.psutil.NoSuchProcess:
                pass
        return out

    def _children(self) -> float:
        t = os.times()
        return t.children_user + t.children_system

    def begin(self) -> CpuShare:
        self.start = (time.monotonic(), self._busy(), self._cluster(), self._children())
        return self

    def finish(self) -> None:
        self.end = (time.monotonic(), self._busy(), self._cluster(), self._children())

    def __enter__(self) -> CpuShare:
        return self.begin()

    def __exit__(self, *exc: object) -> None:
        self.finish()

    def result(self) -> dict[str, float]:
        """Cores used on average. A process that died during the run (a killed replica) is left out of the
        cluster's share and counted among the others; one started during the run counts in full."""
        (t0, busy0, ours0, kids0), (t1, busy1, ours1, kids1) = self.start, self.end
        wall, busy, children = t1 - t0, busy1 - busy0, kids1 - kids0
        ours = sum(cpu - ours0.get(pid, 0.0) for pid, cpu in ours1.items())
        return {
            "machine_busy_cores": round(busy / wall, 2),
            "cluster_cores": round(ours / wall, 2),
            "load_generator_cores": round(children / wall, 2),
            "other_cores": round(max(0.0, busy - ours - children) / wall, 2),
        }


def throughput(n: int, args: argparse.Namespace, round_: int = 1, threads: int | None = None) -> dict[str, Any]:
    """Saturating closed-loop load through the balancer in front of ``n`` fresh replicas.

    ``threads``: torch threads per worker (default: the cores shared out, `cluster.threads_per_replica`).
    """
    workdir = args.workdir / f"throughput-{n}"
    front = free_front()
    t0 = time.monotonic()
    state = cluster.start(n, workdir, front, args.model_store, threads=threads)
    started_s = time.monotonic() - t0
    try:
        out = args.workdir / f"throughput-{n}-locust"
        if args.warmup_s > 0:
            warm = locust(front, workdir, args.throughput_users, args.warmup_s, out / "warmup", args.images, 30)
            wait_locust(warm, out / "warmup", args.warmup_s + 120)
        with CpuShare(workdir) as cpu:
            proc = locust(front, workdir, args.throughput_users, args.throughput_s, out, args.images, args.retry_s)
            records = wait_locust(proc, out, args.throughput_s + 120)
    finally:
        cluster.stop(workdir)
    t_first = min(r["start"] for r in records)
    t_last = max(r["end"] for r in records)
    by_protocol = {p: rate([r for r in records if r["protocol"] == p], t_first, t_last) for p in ("rest", "grpc")}
    return {
        "round": round_,
        "replicas": n,
        "threads_per_replica": state["threads_per_replica"],
        "users": args.throughput_users,
        "seconds": round(t_last - t_first, 1),
        "start_s": round(started_s, 1),
        "rps": rate(records, t_first, t_last),
        "rps_by_protocol": by_protocol,
        "cpu": cpu.result(),
        **summarise(records),
    }


def drill(args: argparse.Namespace) -> dict[str, Any]:
    workdir = args.workdir / "drill"
    front = free_front()
    state = cluster.start(args.replicas, workdir, front, args.model_store)
    victim = cluster.replicas_of(state)[0]
    out = args.workdir / "drill-locust"
    timing: dict[str, float | None] = {"ready": None, "up": None}
    try:
        reference = reference_answers(front, workdir, args.images)
        ref_path = workdir / "reference.json"
        ref_path.write_text(json.dumps(reference, indent=2))
        t_load = time.time()
        cpu = CpuShare(workdir).begin()
        proc = locust(front, workdir, args.users, args.seconds, out, args.images, args.retry_s, ref_path)
        time.sleep(max(0.0, t_load + args.kill_at - time.time()))
        if proc.poll() is not None:
            raise RuntimeError(f"Locust ended before the kill; see {out / 'locust.log'}")
        t_kill = time.time()
        killed = cluster.kill_replica(victim)
        cluster.wait_for_states(workdir, {victim.name: "DOWN"}, timeout=30)
        t_down = time.time()
        time.sleep(max(0.0, t_kill + args.down_s - time.time()))
        cluster.restart_replica(victim, args.model_store, state["threads_per_replica"])
        timing["ready"] = time.time()
        cluster.wait_for_states(workdir, {victim.name: "UP"}, timeout=60)
        timing["up"] = time.time()
        served_before = cluster.answered(workdir, victim.name)
        records = wait_locust(proc, out, args.seconds + 180)
        cpu.finish()
        served_after = cluster.answered(workdir, victim.name) - served_before
    finally:
        cluster.stop(workdir)
    t_end = max(r["end"] for r in records)
    t_up = timing["up"] or t_end
    result: dict[str, Any] = {
        "replicas": args.replicas,
        "users": args.users,
        "seconds": args.seconds,
        "retry_s": args.retry_s,
        "killed": {"replica": victim.name, "pids": killed, "at_s": round(t_kill - t_load, 2)},
        **summarise(records),
        "recovery_s": round(t_up - t_kill, 2),
        "ready_s": round(timing["ready"] - t_kill, 2) if timing["ready"] else None,
        "marked_down_s": round(t_down - t_kill, 2),
        "longest_gap_s": round(longest_gap(records, t_load + 5, t_end), 2),
        "phases": {
            "before_kill_rps": rate(records, t_load + 5, t_kill),
            "one_replica_rps": rate(records, t_kill, t_up),
            "after_recovery_rps": rate(records, t_up, t_end),
        },
        "cpu": cpu.result(),
        "answered_after_recovery": sum(1 for r in records if r["ok"] and r["end"] > t_up),
        # HAProxy's 2xx counter of the killed replica from UP to the end: it rejoined and served.
        "answered_by_restarted_replica": served_after,
        "by_protocol": {p: summarise([r for r in records if r["protocol"] == p]) for p in ("rest", "grpc")},
    }
    return result


def main(args: argparse.Namespace) -> int:
    cluster.haproxy_binary()
    if not (args.model_store / "oamen.mar").is_file():
        raise SystemExit(f"{args.model_store / 'oamen.mar'} is missing: make archive")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result: dict[str, Any] = {"started": started, "cpu_count": os.cpu_count(), "config": vars(args).copy()}
    result["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in result["config"].items()}
    if args.throughput_s > 0:
        configs = parse_configs(args.configs) or [ReplicaConfig(n) for n in sorted({1, args.replicas})]
        result["throughput"] = [
            throughput(c.replicas, args, k + 1, c.threads) for k in range(args.rounds) for c in configs
        ]
    result.update(drill(args))
    write_result(args.json, result)
    if str(args.publish) not in ("", "."):
        publish(args.publish, result)
        print(f"published {args.publish} and rendered the docs from it")
    print(
        f"requests {result['requests']}, failures {result['failures']} (attempts, resent), lost {result['lost']}, "
        f"wrong {result['wrong']}, recovery {result['recovery_s']} s, longest gap {result['longest_gap_s']} s"
    )
    for row in result.get("throughput", []):
        print(f"  {row['replicas']} replica(s): {row['rps']:.1f} req/s ({row['users']} users, lost {row['lost']})")
    print(f"wrote {args.json}")
    return 0 if result["lost"] == 0 and result["answered_by_restarted_replica"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
