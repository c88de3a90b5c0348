"""The cluster: N TorchServe replicas behind the HAProxy balancer, one bearer token checked at the front.
Start (returns when a graded request passes), stop (returns when all are gone), status, token rotation."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Any

from model.paths import ROOT
from ops import server as ts
from ops.cluster import haproxy
from ops.cluster.config import ERROR_502_AS_503, Front, Replica, haproxy_config
from ops.cluster.haproxy import ClusterError, wait_for_states
from ops.cluster.replicas import start_replica, stop_replicas, threads_per_replica
from ops.cluster.state import load_state, save_state, state_path
from ops.cluster.tokens import TOKENS_FILE, ensure_token, new_token, read_tokens, write_tokens
from ops.procs import is_alive, read_pid

DEFAULT_WORKDIR = ROOT / "logs" / "cluster"


def start_balancer(workdir: Path, replicas: list[Replica], front: Front) -> int:
    """Write ``haproxy.cfg`` for ``replicas`` and start HAProxy in the background; returns its pid."""
    workdir = Path(workdir).resolve()
    errorfile = workdir / "502.http"
    errorfile.write_text(ERROR_502_AS_503)
    cfg = workdir / "haproxy.cfg"
    cfg.write_text(
        haproxy_config(replicas, front, str(workdir / TOKENS_FILE), str(errorfile), str(workdir / "haproxy.sock"))
    )
    return haproxy.launch(workdir, cfg)


def reload_balancer(workdir: Path) -> int:
    """Start a new HAProxy on the same configuration and hand over (``-sf``): re-reads ``tokens.lst``.

    The old process stops listening, finishes the requests it holds and exits; no connection is refused.
    """
    return haproxy.reload(workdir)


def stop_balancer(workdir: Path, timeout: float = 10.0) -> bool:
    """SIGTERM HAProxy and wait until it is gone (SIGKILL after ``timeout``). False if it was not running."""
    return haproxy.stop(workdir, timeout)


def replicas_of(state: dict[str, Any]) -> list[Replica]:
    return [Replica(**r) for r in state["replicas"]]


def probe(front: Front, token: str, image: bytes, timeout: float = 60.0) -> dict[str, Any]:
    """One graded request through the balancer (REST), sent until it answers 200 or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        req = urllib.request.Request(
            f"http://127.0.0.1:{front.rest_port}/predictions/{ts.MODEL_NAME}",
            data=image,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "image/png"},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            last = f"{exc.code} {exc.read()[:200]!r}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.5)
    raise ClusterError(f"no graded answer through the balancer within {timeout:.0f} s (last: {last})")


def start(
    n: int,
    workdir: Path = DEFAULT_WORKDIR,
    front: Front | None = None,
    model_store: Path = ROOT / "model_store",
    timeout: float = 240.0,
    threads: int | None = None,
) -> dict[str, Any]:
    """Start ``n`` replicas and the balancer; returns the cluster's state (also in ``<workdir>/cluster.json``).

    ``threads``: torch threads per replica's worker; default: the machine's cores shared out evenly.
    """
    if n < 1:
        raise ValueError(f"the cluster needs at least 1 replica, got {n}")
    workdir = Path(workdir).resolve()
    front = front or Front()
    if running(workdir):
        raise ClusterError(f"a cluster from {workdir} is running; `make cluster-stop` first")
    haproxy.haproxy_binary()  # fail before minutes of start-up
    workdir.mkdir(parents=True, exist_ok=True)
    token = ensure_token(workdir)
    threads = threads or threads_per_replica(n)
    replicas: list[Replica] = []
    state: dict[str, Any] = {"front": asdict(front), "replicas": [], "threads_per_replica": threads}
    try:
        for i in range(n):
            replicas.append(start_replica(model_store, workdir / f"r{i}", threads, timeout))
            state["replicas"] = [asdict(r) for r in replicas]
            save_state(workdir, state)
        state["haproxy_pid"] = start_balancer(workdir, replicas, front)
        save_state(workdir, state)
        wait_for_states(workdir, {r.name: "UP" for r in replicas}, timeout=30)
        probe(front, token, (ROOT / "tests" / "fixtures" / "knee_kl2.png").read_bytes())
    except BaseException:
        stop(workdir)
        raise
    return state


def running(workdir: Path) -> bool:
    """Whether HAProxy or any replica of the cluster in ``workdir`` is alive."""
    state = load_state(workdir)
    if state is None:
        return False
    alive = [is_alive(read_pid(Path(workdir) / "haproxy.pid"))]
    alive += [is_alive(ts.server_pid(Path(r.workdir))) for r in replicas_of(state)]
    return any(alive)


def stop(workdir: Path = DEFAULT_WORKDIR) -> bool:
    """Stop the balancer, then every replica (in parallel, each drained); returns when all are gone."""
    workdir = Path(workdir).resolve()
    state = load_state(workdir)
    was = stop_balancer(workdir)
    if state is None:
        return was
    stopped = stop_replicas([Path(r.workdir) for r in replicas_of(state)])
    state_path(workdir).unlink(missing_ok=True)
    return was or stopped


def rotate(workdir: Path = DEFAULT_WORKDIR) -> str:
    """A new token: accepted from now on, beside the previous one (until the next rotation)."""
    workdir = Path(workdir).resolve()
    tokens = read_tokens(workdir)
    token = new_token()
    write_tokens(workdir, [*tokens[-1:], token])
    if is_alive(read_pid(workdir / "haproxy.pid")):
        reload_balancer(workdir)
    return token
