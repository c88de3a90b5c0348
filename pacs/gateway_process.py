"""The DICOM gateway (``python -m gateway serve``) started and stopped in the background from a PACS working folder."""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ops.procs import is_alive
from pacs.tls import PacsTLS
from pacs.workdir import DEFAULT_WORKDIR, ROOT, PacsError, save_state, spawn, stop, tail

__all__ = ["GatewayProcess", "DoorCerts", "start_gateway", "stop_gateway"]


@dataclass(frozen=True)
class DoorCerts:
    """The gateway's credentials at the front door (ops/door.py): the door's CA, its certificate and key."""

    ca: Path
    cert: Path
    key: Path


@dataclass
class GatewayProcess:
    workdir: Path
    pid: int
    port: int

    @property
    def spool(self) -> Path:
        return self.workdir / "spool"

    @property
    def audit(self) -> Path:
        return self.workdir / "audit.jsonl"


def start_gateway(
    workdir: Path = DEFAULT_WORKDIR,
    port: int = 11112,
    ts_url: str = "http://127.0.0.1:8080",
    key_file: Path | None = None,
    pacs_port: int = 4242,
    allow: Iterable[str] = ("ORTHANC",),
    max_backoff_s: float = 5.0,
    timeout: float = 60.0,
    tls: PacsTLS | None = None,
    door: DoorCerts | None = None,
    metrics_port: int | None = None,
) -> GatewayProcess:
    """Start ``python -m gateway serve`` in the background; return once it accepts connections.

    Raises:
        PacsError: already running, or it exited or did not listen in time (with its log).
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(mode=0o700, parents=True, exist_ok=True)  # patient images: the owner only
    cmd = [
        sys.executable, "-m", "gateway", "serve",
        "--spool", str(workdir / "spool"),
        "--audit", str(workdir / "audit.jsonl"),
        "--port", str(port),
        "--ts-url", ts_url,
        "--pacs", f"ORTHANC@127.0.0.1:{pacs_port}",
        "--max-backoff", str(max_backoff_s),
    ]  # fmt: skip
    if key_file is not None:
        cmd += ["--key-file", str(Path(key_file).resolve())]
    if tls is not None:
        cmd += ["--dicom-tls-cert", str(tls.gateway.cert), "--dicom-tls-key", str(tls.gateway.key)]
        cmd += ["--dicom-tls-ca", str(tls.ca)]
    if door is not None:  # grading through the front door (ops/door.py)
        cmd += ["--ts-ca", str(door.ca), "--ts-cert", str(door.cert), "--ts-key", str(door.key)]
    if metrics_port is not None:  # Prometheus scrapes it (make monitor, docs/MONITORING.md)
        cmd += ["--metrics-port", str(metrics_port)]
    for ae in allow:
        cmd += ["--allow", ae]
    pid = spawn(workdir, "gateway", cmd, ROOT)
    save_state(workdir, gateway_port=port, ts_url=ts_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_alive(pid):
            raise PacsError(f"the gateway exited during start-up. Log:\n{tail(workdir / 'gateway.log')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return GatewayProcess(workdir, pid, port)
        except OSError:
            time.sleep(0.1)
    stop(workdir, "gateway", 10)
    raise PacsError(
        f"the gateway did not listen on {port} within {timeout:.0f} s. Log:\n{tail(workdir / 'gateway.log')}"
    )


def stop_gateway(workdir: Path = DEFAULT_WORKDIR, timeout: float = 30.0, kill: bool = False) -> bool:
    """Stop the gateway (SIGTERM, or SIGKILL with ``kill``: the drill) and wait until it is gone.

    What it had queued stays in its spool for the next start.
    """
    return stop(Path(workdir).resolve(), "gateway", timeout, kill=kill)
