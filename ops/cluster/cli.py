"""The command-line options `python -m ops.cluster` and `python -m ops.door` share: how many replicas, where
they work, the archive, the front's ports and the replicas' start-up."""

from __future__ import annotations

import argparse
from pathlib import Path

from ops.cluster.config import Front
from ops.cluster.haproxy import server_states
from ops.cluster.lifecycle import ROOT


def add_front_args(p: argparse.ArgumentParser, replicas: int, workdir: Path, front: Front) -> argparse.ArgumentParser:
    """Add ``--replicas``, ``--workdir``, ``--model-store``, the three ports, ``--timeout`` and ``--threads``."""
    p.add_argument("--replicas", "-n", type=int, default=replicas)
    p.add_argument("--workdir", type=Path, default=workdir)
    p.add_argument("--model-store", type=Path, default=ROOT / "model_store")
    p.add_argument("--rest-port", type=int, default=front.rest_port)
    p.add_argument("--grpc-port", type=int, default=front.grpc_port)
    p.add_argument("--health-port", type=int, default=front.health_port)
    p.add_argument("--timeout", type=float, default=240.0, help="seconds for each replica to become READY")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: cores / replicas)")
    return p


def print_states(workdir: Path, up: bool) -> int:
    """``status``: each replica as HAProxy sees it (UP, DOWN...); 1 when nothing runs from ``workdir``."""
    if not up:
        print("not running")
        return 1
    for name, status in server_states(workdir).items():
        print(f"{name}: {status}")
    return 0
