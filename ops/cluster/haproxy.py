"""The HAProxy process in front of the replicas, shared by the balancer (`ops.cluster`) and the secure door
(`ops.door`): start it in the background, reload it without dropping a connection, stop it, and ask it
over its stats socket (runtime API) which replicas are up and what they answered."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from ops.procs import is_alive, read_pid, stop_pidfile


class ClusterError(RuntimeError):
    """The cluster did not come up (or go down) as asked; the message says why and what to do."""


def haproxy_binary() -> str:
    exe = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if Path(p).is_file()), None)
    if exe is None:
        raise ClusterError("HAProxy is not installed: sudo apt-get install -y haproxy")
    return exe


def check_config(cfg: Path) -> None:
    """``haproxy -c``: raises ClusterError with HAProxy's own words when the file is not valid."""
    proc = subprocess.run([haproxy_binary(), "-c", "-q", "-f", str(cfg)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ClusterError(f"HAProxy refuses {cfg}:\n{(proc.stdout + proc.stderr).strip()[-3000:]}")


def launch(workdir: Path, cfg: Path, error: type[Exception] = ClusterError) -> int:
    """Check ``cfg`` and start HAProxy on it in the background (pid file and log in ``workdir``); returns its pid."""
    check_config(cfg)
    pidfile = workdir / "haproxy.pid"
    pidfile.unlink(missing_ok=True)
    log = workdir / "haproxy.log"
    with open(log, "w") as sink:
        proc = subprocess.run(
            [haproxy_binary(), "-D", "-f", str(cfg), "-p", str(pidfile)], stdout=sink, stderr=subprocess.STDOUT
        )
    pid = read_pid(pidfile)
    if proc.returncode != 0 or not is_alive(pid):
        raise error(f"HAProxy did not start ({proc.returncode}): {log.read_text(errors='replace')[-2000:]}")
    return pid  # type: ignore[return-value]


def reload(
    workdir: Path, take_over_sockets: bool = False, what: str = "HAProxy reload", error: type[Exception] = ClusterError
) -> int:
    """Start a new HAProxy on the same configuration and hand over (``-sf``); returns the new pid.

    The old process stops listening, finishes the requests it holds and exits; no connection is refused.
    ``take_over_sockets`` (``-x``, the stats socket needs ``expose-fd listeners``): the new process takes the
    listening sockets over, so connections waiting in their queue stay there.
    """
    workdir = Path(workdir).resolve()
    pidfile = workdir / "haproxy.pid"
    old = read_pid(pidfile)
    cfg = workdir / "haproxy.cfg"
    check_config(cfg)
    cmd = [haproxy_binary(), "-D", "-f", str(cfg), "-p", str(pidfile)]
    if take_over_sockets:
        cmd += ["-x", str(workdir / "haproxy.sock")]
    if is_alive(old):
        cmd += ["-sf", str(old)]
    with open(workdir / "haproxy.log", "a") as sink:
        proc = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT)
    pid = read_pid(pidfile)
    if proc.returncode != 0 or pid == old or not is_alive(pid):
        raise error(f"{what} failed ({proc.returncode}); see {workdir / 'haproxy.log'}")
    return pid  # type: ignore[return-value]


def stop(workdir: Path, timeout: float = 10.0) -> bool:
    """SIGTERM HAProxy and wait until it is gone (SIGKILL after ``timeout``). False if it was not running."""
    return stop_pidfile(Path(workdir) / "haproxy.pid", timeout)


def runtime(workdir: Path, command: str, payload: str | None = None, timeout: float = 10.0) -> str:
    """One command on HAProxy's stats socket (its runtime API) in ``workdir``; returns its answer.

    ``payload`` is sent as the command's ``<<`` block (e.g. a CRL for ``set ssl crl-file``). Raises OSError
    when the socket does not answer.
    """
    line = command if payload is None else f"{command} <<\n{payload.rstrip()}\n"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(Path(workdir) / "haproxy.sock"))
        sock.sendall(line.encode() + b"\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    finally:
        sock.close()
    return data.decode(errors="replace").strip()


def server_stats(workdir: Path) -> dict[tuple[str, str], dict[str, str]]:
    """HAProxy's ``show stat`` from the stats socket: {(backend, server): its row (status, hrsp_2xx...)}."""
    lines = runtime(workdir, "show stat", timeout=5).splitlines()
    header = lines[0].lstrip("# ").split(",")
    rows = {}
    for line in lines[1:]:
        row = dict(zip(header, line.split(",")))
        if row.get("svname") not in ("BACKEND", "FRONTEND", None):
            rows[(row["pxname"], row["svname"])] = row
    return rows


def server_states(workdir: Path) -> dict[str, str]:
    """{replica name: HAProxy's status (UP, DOWN, 'UP 1/2', MAINT...)} of the REST backend."""
    return {sv: row.get("status", "") for (px, sv), row in server_stats(workdir).items() if px == "replicas_rest"}


def answered(workdir: Path, replica: str) -> int:
    """Requests ``replica`` has answered with a 2xx through the balancer so far, REST and gRPC."""
    stats = server_stats(workdir)
    return sum(int(stats[(px, replica)].get("hrsp_2xx") or 0) for px in ("replicas_rest", "replicas_grpc"))


def wait_for_states(workdir: Path, want: dict[str, str], timeout: float = 30.0) -> dict[str, str]:
    """Poll `server_states` until every named replica has the wanted status (UP, DOWN)."""
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        states = server_states(workdir)
        # Exact: "UP 1/2" is a server going down, "DOWN 1/2" one coming up.
        if all(states.get(k, "") == v for k, v in want.items()):
            return states
        time.sleep(0.1)
    raise ClusterError(f"HAProxy's replicas are {states}, not {want} within {timeout:.0f} s")
