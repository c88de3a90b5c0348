"""A PACS working folder (default ``pacs/data/``): its private files, its state and the processes started from it.

Orthanc and the gateway each run from such a folder as a background process with a pid file and a
log; docs/PACS.md ("Running it") lists what the folder holds.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ops.procs import is_alive, read_pid

__all__ = ["ROOT", "DEFAULT_WORKDIR", "PacsError", "write_private", "state", "save_state", "spawn", "tail", "stop"]

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
DEFAULT_WORKDIR = HERE / "data"

log = logging.getLogger(__name__)


class PacsError(RuntimeError):
    """Orthanc or the gateway did not start or stop as asked; the message says why and what to do."""


def write_private(path: Path, text: str) -> None:
    """Write ``text`` readable by its owner only (it holds a password)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def state(workdir: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(workdir) / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def save_state(workdir: Path, **values: Any) -> None:
    values = state(workdir) | values
    (Path(workdir) / "state.json").write_text(json.dumps(values, indent=2))


def spawn(workdir: Path, name: str, cmd: Sequence[str], cwd: Path) -> int:
    pidfile = workdir / f"{name}.pid"
    if is_alive(read_pid(pidfile)):
        raise PacsError(f"{name} from {workdir} is already running (pid {read_pid(pidfile)}): `make pacs-stop` first")
    with open(workdir / f"{name}.log", "ab") as sink:
        # Output goes to a file, not a pipe: nothing reads a pipe once the starting command has returned.
        proc = subprocess.Popen(
            list(cmd), cwd=cwd, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    pidfile.write_text(f"{proc.pid}\n")
    return proc.pid


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def stop(workdir: Path, name: str, timeout: float, kill: bool = False) -> bool:
    """Signal the process of ``name`` and return once it is gone; False when it was not running."""
    pidfile = Path(workdir) / f"{name}.pid"
    pid = read_pid(pidfile)
    if not is_alive(pid):
        pidfile.unlink(missing_ok=True)
        return False
    assert pid is not None
    os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while is_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if is_alive(pid):
        log.warning("%s (pid %d) did not stop within %.0f s: killed", name, pid, timeout)
        os.kill(pid, signal.SIGKILL)
        while is_alive(pid):
            time.sleep(0.05)
    pidfile.unlink(missing_ok=True)
    return True
