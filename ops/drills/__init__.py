"""Fault drills and the soak: what KOA-Serve does when a worker dies, the server restarts, a replica is
killed, or the load goes on for hours (docs/RELIABILITY.md, docs/DEPLOY.md).

- ``python -m ops.drills.kill_worker``: SIGKILL the TorchServe worker under load.
- ``python -m ops.drills.restart``: ``make restart`` under load; no request lost.
- ``python -m ops.drills.replicas`` (``make drill-replicas``): throughput of 1 and N replicas behind
  HAProxy, and one replica killed under load.
- ``python -m ops.drills.soak``: hours of load; memory, latency and failures over time.

The load comes from `ops.load`, the servers from `ops.server` and `ops.cluster`.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from model.paths import ROOT
from ops.results import DATA_IMAGES, write_result


def add_drill_args(p: argparse.ArgumentParser, json_default: Path | None = None) -> argparse.ArgumentParser:
    """The options every drill shares (`kill_worker`, `restart`, `soak`): archive, images, output."""
    p.add_argument("--store", type=Path, default=ROOT / "model_store")
    p.add_argument("--images", type=Path, default=DATA_IMAGES)
    p.add_argument("--max-images", type=int, default=16)
    p.add_argument("--json", type=Path, default=json_default, help="the figures, configuration and every record")
    p.add_argument(
        "--publish", type=Path, default=None, help="also the figures alone, for docs/results/ (then the docs rendered)"
    )
    return p


def write_drill(args: argparse.Namespace, result: dict[str, Any], records: list[Any]) -> None:
    """The drill's figures and configuration, with every request's record (`ops.load.Record`), to ``args.json``;
    without the records to ``args.publish`` (a result the docs quote: docs/results/), then the docs rendered."""
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    # What else ran: these machines are shared, and a drill's timings are the contention's as much as its own.
    machine = {"cores": os.cpu_count(), "loadavg_1min_at_end": round(os.getloadavg()[0], 2)}
    summary = {"finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine, "config": config}
    summary.update(result)
    write_result(args.json, {**summary, "records": [asdict(r) for r in records]})
    if args.publish is not None:
        from ops import render_docs

        write_result(args.publish, summary)
        render_docs.main([])
