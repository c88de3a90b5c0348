"""The running door, changed through HAProxy's runtime API (its stats socket) without a restart: a new CRL,
the policy's maps, and the count of audit lines HAProxy could not send."""

from __future__ import annotations

import os
from pathlib import Path

from ops.cluster import haproxy
from ops.cluster.state import load_state
from ops.door.config import STATE_FILE, DoorError
from ops.door.policy import ClientPolicy, write_maps
from ops.procs import is_alive, read_pid


def runtime(workdir: Path, command: str, payload: str | None = None, timeout: float = 10.0) -> str:
    """One command on the running door's stats socket (HAProxy's runtime API); returns its answer.

    ``payload`` is sent as the command's ``<<`` block (e.g. a CRL for ``set ssl crl-file``).
    """
    try:
        return haproxy.runtime(workdir, command, payload, timeout)
    except OSError as exc:
        raise DoorError(f"the door's runtime API ({Path(workdir) / 'haproxy.sock'}) did not answer: {exc}") from None


def _pem_blocks(path: str | os.PathLike[str]) -> str:
    text = Path(path).read_text()
    return text[text.index("-----BEGIN") :]


def reload_crl(workdir: Path) -> str:
    """Hand the CRL file the door was started with to the running HAProxy, without a restart.

    New handshakes are checked against it at once; established connections (other clients') stay open.
    """
    state = load_state(workdir, STATE_FILE)
    if state is None or not is_alive(read_pid(Path(workdir) / "haproxy.pid")):
        raise DoorError(f"no door is running from {workdir}")
    crl = state["files"]["crl"]
    answer = runtime(workdir, f"set ssl crl-file {crl}", _pem_blocks(crl))
    if "transaction created" not in answer.lower() and "updated" not in answer.lower():
        raise DoorError(f"HAProxy refused the new CRL: {answer}")
    answer = runtime(workdir, f"commit ssl crl-file {crl}")
    if "success" not in answer.lower():
        raise DoorError(f"HAProxy did not commit the new CRL: {answer}")
    return answer


def apply_policy(workdir: Path, policy: dict[str, ClientPolicy]) -> None:
    """Make the running door's maps equal to ``policy`` (runtime API; also rewrites the map files).

    Entries are set, added and deleted one by one (never cleared first), so that a client that stays
    in the policy is never refused while the change is applied.
    """
    workdir = Path(workdir).resolve()
    keys = dict(ln.split(" ", 1) for ln in (workdir / "keys.map").read_text().splitlines() if ln)
    write_maps(workdir, policy, keys)
    for name in ("access.map", "rates.map"):
        path = workdir / name
        want = dict(ln.split(" ", 1) for ln in path.read_text().splitlines() if ln)
        # "show map" lines: <entry id> <key> <value>
        have = {ln.split()[1] for ln in runtime(workdir, f"show map {path}").splitlines() if len(ln.split()) >= 3}
        for k, v in want.items():
            runtime(workdir, f"{'set' if k in have else 'add'} map {path} {k} {v}")
        for k in have - set(want):
            runtime(workdir, f"del map {path} {k}")



def dropped_logs(workdir: Path) -> int:
    """Log lines HAProxy could not send to the audit receiver since it started (``show info``: DroppedLogs)."""
    for ln in runtime(workdir, "show info").splitlines():
        if ln.startswith("DroppedLogs:"):
            return int(ln.split(":", 1)[1])
    return 0

