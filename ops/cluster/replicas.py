"""TorchServe replicas on one machine: each on free loopback ports with its own work folder and its share
of the cores; started, started again on its own ports, or killed as a crash would."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from model.settings import TORCH_THREADS
from ops import server as ts
from ops.cluster.config import Replica
from ops.cluster.haproxy import ClusterError
from ops.procs import is_alive


def replica_keys(workdir: Path) -> dict[str, str]:
    """The keys `ops.server.start` polls a replica with: none, when its config turns token authorization off.

    TorchServe 0.12 writes no key file when token authorization is off, so such a replica (its own config
    says so) is polled without a key; any other server still needs its key file.
    """
    try:
        return ts.read_keys(workdir)
    except ts.ServeError:
        config = Path(workdir) / "config.properties"
        if config.is_file() and ts.parse_properties(config.read_text()).get("disable_token_authorization") == "true":
            return {"inference": "", "management": "", "api": ""}
        raise


@contextlib.contextmanager
def _threads(threads: int) -> Iterator[None]:
    """A replica's share of the cores: N workers share the machine's cores, so each gets ``threads``
    (``KOA_TORCH_THREADS``, inherited through Java), or they would fight over every core."""
    saved = os.environ.get(TORCH_THREADS.name)
    os.environ[TORCH_THREADS.name] = str(threads)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(TORCH_THREADS.name, None)
        else:
            os.environ[TORCH_THREADS.name] = saved



def launch_replica(
    model_store: Path,
    workdir: Path,
    threads: int,
    timeout: float,
    properties: dict[str, str],
    keys: Callable[[Path], dict[str, str]] | None = None,
) -> Replica:
    """One TorchServe on free loopback ports with ``properties`` and ``threads`` torch threads per worker."""
    with _threads(threads):
        srv = ts.start_on_free_ports(model_store, workdir, timeout=timeout, properties=properties, keys=keys)
    port = lambda url: int(url.rsplit(":", 1)[1])  # noqa: E731
    return Replica(
        name=Path(workdir).name,
        workdir=str(Path(workdir).resolve()),
        rest_port=port(srv.inference_url),
        grpc_port=srv.grpc_port,
        management_port=port(srv.management_url),
        metrics_port=port(srv.metrics_url),
    )


def start_replica(model_store: Path, workdir: Path, threads: int, timeout: float = 240.0) -> Replica:
    """One TorchServe on free loopback ports, token authorization off (the balancer checks the token)."""
    props = {"disable_token_authorization": "true"}
    return launch_replica(model_store, workdir, threads, timeout, props, keys=replica_keys)


def restart_replica(replica: Replica, model_store: Path, threads: int, timeout: float = 240.0) -> None:
    """Start a stopped (or killed) replica again on its own ports, from its rendered configuration."""
    wd = Path(replica.workdir)
    with _threads(threads):
        ts.start(model_store, wd / "config.properties", wd, timeout=timeout, keys=replica_keys)


def kill_replica(replica: Replica) -> list[int]:
    """SIGKILL a replica's Java frontend and its workers at once (a crashed server); returns their pids."""
    java = ts.server_pid(Path(replica.workdir))
    if not is_alive(java):
        raise ClusterError(f"replica {replica.name} is not running")
    pids = [java, *ts.descendants(java)]  # type: ignore[list-item]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    while any(is_alive(p) for p in pids):
        time.sleep(0.02)
    return pids


def threads_per_replica(n: int) -> int:
    return max(1, (os.cpu_count() or 1) // n)


def stop_replicas(workdirs: list[Path]) -> bool:
    """Stop the servers of ``workdirs`` in parallel, each drained (`ops.server.stop`); returns when all are gone.

    True if any was running.
    """
    results: list[bool] = []
    threads = [threading.Thread(target=lambda wd=wd: results.append(ts.stop(Path(wd)))) for wd in workdirs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return any(results)
