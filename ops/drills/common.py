"""What the drills share: their common options, writing a drill's result (and publishing the figures the docs
quote), and finding TorchServe's Python worker and reading its state from the management API."""

from __future__ import annotations

import argparse
import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psutil

from model.paths import ROOT
from ops import server as ts
from ops.results import DATA_IMAGES, write_result

WORKER_MARK = "model_service_worker.py"


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
        publish(args.publish, summary)


def publish(path: Path, result: dict[str, Any]) -> None:
    """Write ``result`` where the docs quote it from (docs/results/), then render the docs from the results."""
    # lazy: rendering the docs loads the model code (torch, seconds); only a drill run with --publish needs it
    from ops import render_docs

    write_result(path, result)
    render_docs.main([])


def worker_processes(java_pid: int) -> list[Any]:
    """psutil.Process objects of the Java frontend's children that run ``model_service_worker.py``."""
    found = []
    try:
        children = psutil.Process(java_pid).children(recursive=True)
    except psutil.Error:
        return []
    for child in children:
        try:
            if any(WORKER_MARK in part for part in child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def management_workers(srv: ts.Server, model: str = ts.MODEL_NAME) -> list[dict[str, Any]]:
    """The model's ``workers`` list from the management API ([] when it cannot be read)."""
    req = urllib.request.Request(
        f"{srv.management_url}/models/{model}", headers={"Authorization": f"Bearer {srv.keys()['management']}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read())[0].get("workers", [])
    except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError):
        return []
