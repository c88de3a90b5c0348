"""Training on two machines: `torchrun` with two nodes, rendezvous over TCP, as docs/DEPLOY.md gives it.

tests/test_fit.py runs DDP with ``--standalone`` (one node, two processes). This test starts two
``torchrun`` launchers the way two machines would, each ``--nnodes 2 --nproc_per_node 1`` with its
own ``--node_rank`` and the same ``--rdzv-endpoint``, here both on 127.0.0.1: the c10d rendezvous,
the gloo process group across launchers and the ranks' agreement on the deadline are the same code
paths a run on two hosts takes; only the network between them is loopback.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_PER_GRADE


def two_node_command(node_rank: int, endpoint: str, *train_args: str) -> list[str]:
    """The command docs/DEPLOY.md runs on each machine (node_rank 0 on the machine at ``endpoint``)."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node_rank),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "koa-two-nodes",
        "-m", "train.fit", *train_args,
    ]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_on_two_nodes_through_torchrun(tiny_koa: Path, tmp_path: Path) -> None:
    out = tmp_path / "two-nodes"
    endpoint = f"127.0.0.1:{_free_port()}"
    train = ["--data", str(tiny_koa), "--out", str(out), "--model", "oamen_lite", "--input-size", "32"]
    # --cache-dir '': never the shared cache/; --time-limit only to run the ranks' deadline agreement.
    train += ["--batch-size", "8", "--threads", "1", "--cache-dir", "", "--epochs", "1", "--device", "cpu"]
    # --tune-fraction 0: all 50 training images are trained on, so the per-rank count below is exact.
    train += ["--time-limit", "10", "--tune-fraction", "0"]
    # GLOO_SOCKET_IFNAME: the interface the ranks talk over (on two machines, their shared network's).
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    nodes = [
        subprocess.Popen(
            two_node_command(rank, endpoint, *train),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    logs = []
    try:
        for node in nodes:
            logs.append(node.communicate(timeout=300)[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    for rank, (node, log) in enumerate(zip(nodes, logs)):
        assert node.returncode == 0, f"node {rank}:\n{log[-3000:]}"
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2
    # The balanced epoch (5 grades x TINY_PER_GRADE images) split over the two nodes' ranks, in
    # batches of 8 with each rank's remainder dropped: both ranks trained, on different halves.
    per_rank = 5 * TINY_PER_GRADE // 2
    history = json.loads((out / "history.json").read_text())
    assert [r["train_images"] for r in history] == [per_rank - per_rank % 8]
    assert (out / "best.pt").is_file()
