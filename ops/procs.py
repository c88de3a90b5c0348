"""Processes and ports of the servers this project starts (TorchServe, HAProxy, Orthanc, the gateway).

Standard library only, so the PACS side (`pacs`) and the operations share it without pulling in more.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path

__all__ = ["free_ports", "read_pid", "is_alive", "descendants", "stop_pid", "stop_pidfile"]


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports on 127.0.0.1 that were free a moment ago."""
    socks = [socket.socket() for _ in range(n)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    return ports


def read_pid(path: Path) -> int | None:
    """The process id in a pid file (its first word), or None when there is none."""
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def is_alive(pid: int | None) -> bool:
    """Whether process ``pid`` runs; a zombie (killed, not yet reaped by its parent) is gone for our purposes."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def descendants(pid: int) -> list[int]:
    """The process ids of every child of ``pid``, recursively ([] when psutil cannot tell)."""
    try:
        import psutil

        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except Exception:
        return []


def stop_pid(pid: int | None, timeout: float = 10.0) -> bool:
    """SIGTERM process ``pid`` and wait until it is gone (SIGKILL after ``timeout``). False if it was not running."""
    if not is_alive(pid):
        return False
    os.kill(pid, signal.SIGTERM)  # type: ignore[arg-type]
    deadline = time.monotonic() + timeout
    while is_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if is_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # type: ignore[arg-type]
        while is_alive(pid):
            time.sleep(0.05)
    return True


def stop_pidfile(pidfile: Path, timeout: float = 10.0) -> bool:
    """`stop_pid` on the process id in ``pidfile``."""
    return stop_pid(read_pid(pidfile), timeout)
