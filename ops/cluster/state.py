"""The state file of a running cluster or door (``cluster.json``, ``door.json``): its front, its replicas and
the processes it started, so that ``stop`` and ``status`` find them from another process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

STATE_FILE = "cluster.json"


def state_path(workdir: Path, name: str = STATE_FILE) -> Path:
    return Path(workdir) / name


def load_state(workdir: Path, name: str = STATE_FILE) -> dict[str, Any] | None:
    try:
        return json.loads(state_path(workdir, name).read_text())
    except (OSError, ValueError):
        return None


def save_state(workdir: Path, state: dict[str, Any], name: str = STATE_FILE) -> None:
    state_path(workdir, name).write_text(json.dumps(state, indent=2))
