"""The door's processes: its TorchServe replicas (token authorization on, the door holds their keys), the
audit receiver and HAProxy; started together, stopped together, reloaded without losing a request."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ops import server as ts
from ops.cluster import haproxy
from ops.cluster.config import ERROR_502_AS_503, Replica
from ops.cluster.replicas import launch_replica, stop_replicas, threads_per_replica
from ops.cluster.state import load_state, save_state, state_path
from ops.cluster.tokens import write_private
from ops.door.config import DEFAULT_WORKDIR, ROOT, STATE_FILE, DoorError, DoorFiles, DoorFront, door_config
from ops.door.policy import read_policy, write_maps
from ops.procs import is_alive, read_pid, stop_pidfile

# Keys behind the door never leave the host: the door holds them, so they may live long (minutes).
REPLICA_KEY_MINUTES = 30 * 24 * 60


@dataclass
class KeyedReplica:
    """A replica behind the door and its inference key (the door adds it to every request it forwards)."""

    replica: Replica
    key: str


def start_receiver(workdir: Path) -> int:
    """The audit receiver (``python -m ops.audit serve``) on ``<workdir>/audit.sock``; returns its pid."""
    sock = workdir / "audit.sock"
    sock.unlink(missing_ok=True)
    with open(workdir / "audit-receiver.log", "a") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ops.audit", "serve", str(workdir / "audit.jsonl"), "--socket", str(sock)],
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 15
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise DoorError(f"the audit receiver did not start; see {workdir / 'audit-receiver.log'}")
        time.sleep(0.05)
    (workdir / "audit-receiver.pid").write_text(f"{proc.pid}\n")
    return proc.pid



def start_replica(model_store: Path, workdir: Path, threads: int, timeout: float) -> KeyedReplica:
    """One TorchServe on free loopback ports with token authorization ON; returns it and its inference key."""
    props = {"token_expiration_min": str(REPLICA_KEY_MINUTES)}
    replica = launch_replica(model_store, workdir, threads, timeout, props)
    return KeyedReplica(replica, ts.read_keys(workdir)["inference"])


def start_haproxy(workdir: Path, replicas: list[Replica], front: DoorFront, files: DoorFiles) -> int:
    workdir = Path(workdir).resolve()
    (workdir / "502.http").write_text(ERROR_502_AS_503)
    cfg = workdir / "haproxy.cfg"
    write_private(cfg, door_config(replicas, front, files, workdir))
    return haproxy.launch(workdir, cfg, error=DoorError)


def start(
    n: int = 1,
    workdir: Path = DEFAULT_WORKDIR,
    front: DoorFront | None = None,
    files: DoorFiles | None = None,
    model_store: Path = ROOT / "model_store",
    timeout: float = 240.0,
    threads: int | None = None,
    replicas: list[KeyedReplica] | None = None,
) -> dict[str, Any]:
    """Start ``n`` TorchServe replicas, the audit receiver and HAProxy; returns the door's state.

    ``replicas``: servers already running, with their inference keys, used instead of starting ``n`` (tests).
    """
    workdir = Path(workdir).resolve()
    front, files = front or DoorFront(), files or DoorFiles()
    files.check()
    if running(workdir):
        raise DoorError(f"a door from {workdir} is running; `make stop TLS=1` first")
    haproxy.haproxy_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o700)
    policy = read_policy(files.policy)
    state: dict[str, Any] = {
        "front": asdict(front),
        "files": asdict(files),
        "replicas": [],
        "own_replicas": replicas is None,
    }
    try:
        if replicas is None:
            threads = threads or threads_per_replica(n)
            replicas = []
            for i in range(n):
                replicas.append(start_replica(model_store, workdir / f"r{i}", threads, timeout))
                state["replicas"] = [asdict(r.replica) for r in replicas]
                save_state(workdir, state, STATE_FILE)
        state["replicas"] = [asdict(r.replica) for r in replicas]
        write_maps(workdir, policy, {r.replica.name: r.key for r in replicas})
        state["receiver_pid"] = start_receiver(workdir)
        save_state(workdir, state, STATE_FILE)
        state["haproxy_pid"] = start_haproxy(workdir, [r.replica for r in replicas], front, files)
        save_state(workdir, state, STATE_FILE)
        haproxy.wait_for_states(workdir, {r.replica.name: "UP" for r in replicas}, timeout=30)
    except BaseException:
        stop(workdir)
        raise
    return state


def running(workdir: Path) -> bool:
    workdir = Path(workdir)
    state = load_state(workdir, STATE_FILE)
    if state is None:
        return False
    alive = [is_alive(read_pid(workdir / p)) for p in ("haproxy.pid", "audit-receiver.pid")]
    if state.get("own_replicas"):
        alive += [is_alive(ts.server_pid(Path(r["workdir"]))) for r in state["replicas"]]
    return any(alive)


def stop(workdir: Path = DEFAULT_WORKDIR) -> bool:
    """Stop HAProxy (it finishes the requests it holds), then the audit receiver, then the door's replicas."""
    workdir = Path(workdir).resolve()
    state = load_state(workdir, STATE_FILE)
    was = haproxy.stop(workdir)
    time.sleep(0.2)  # the last log datagrams reach the receiver before it goes
    was = stop_pidfile(workdir / "audit-receiver.pid") or was
    if state is not None and state.get("own_replicas"):
        was = stop_replicas([Path(r["workdir"]) for r in state["replicas"]]) or was
    state_path(workdir, STATE_FILE).unlink(missing_ok=True)
    return was


def reload(workdir: Path = DEFAULT_WORKDIR) -> int:
    """Restart the door without losing a request: a new HAProxy on the same configuration takes the
    listening sockets over from the old one (``-x``: connections waiting in their queue stay there) and
    the old one finishes the requests it holds (``-sf``). It re-reads the certificate, CA, CRL and maps
    from their files (a new server certificate, say). The rate counters start again. Returns the new pid."""
    workdir = Path(workdir).resolve()
    old = read_pid(workdir / "haproxy.pid")
    if not is_alive(old):
        raise DoorError(f"no door is running from {workdir}")
    return haproxy.reload(workdir, take_over_sockets=True, what="the door's reload", error=DoorError)

