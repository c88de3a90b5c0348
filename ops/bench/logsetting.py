"""What the frontend's logging costs: TorchServe's built-in log4j2 setting against ``log4j2.xml``.

``python -m ops.bench logging [--rounds 2] [--seconds 20] [--clients 32]`` (``make bench-logging``): both settings
each round, on fresh private servers, under closed-loop REST clients. What is reported: docs/BENCHMARKS.md
("Frontend logging").
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import zipfile
from pathlib import Path

from ops import server as ts
from ops.bench.common import ROOT, cpu_use, server
from ops.bench.report import logging_report
from ops.load import drive
from ops.load import image_bodies as load_images
from ops.results import DATA_IMAGES, write_result


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--images", type=Path, default=DATA_IMAGES)
    p.add_argument("--store", type=Path, default=ROOT / "model_store")
    p.add_argument("--json", type=Path, default=None)
    return p


def builtin_log_config(dest: Path) -> Path:
    """TorchServe's own log4j2.xml, as packed in its frontend jar (what runs without --log-config)."""
    import ts

    jar = Path(ts.__file__).resolve().parent / "frontend" / "model-server.jar"
    with zipfile.ZipFile(jar) as z:
        dest.write_bytes(z.read("log4j2.xml"))
    return dest


def shipped_batching() -> tuple[int, int]:
    props = ts.parse_properties((ROOT / "config.properties").read_text())
    model = json.loads(props["models"])[ts.MODEL_NAME]["1.0"]
    return int(model["batchSize"]), int(model["maxBatchDelay"])


def log_volume(workdir: Path) -> dict[str, int]:
    files = [*sorted((workdir / "logs").glob("*.log")), workdir / "console.log"]
    lines = {f.name: len(f.read_bytes().splitlines()) for f in files if f.is_file()}
    return {"log_lines": sum(lines.values()), "ts_log_lines": lines.get("ts_log.log", 0)}


def run_one(label: str, log_config: Path, images: list[bytes], args: argparse.Namespace) -> dict:
    batch, delay = shipped_batching()
    with server(args.store, batch, delay, log_config=log_config) as srv:
        before = log_volume(srv.workdir)
        with cpu_use(srv) as cores:
            rest = drive(srv, images, "rest", args.clients, args.seconds)
        after = log_volume(srv.workdir)
    seconds = args.seconds + 3  # drive()'s ramp is logged too
    return {
        "logging": label,
        "rps": rest["rps"],
        "failures": rest["failures"],
        **{f"cores_{k}": v for k, v in cores.items()},
        "log_lines_per_s": (after["log_lines"] - before["log_lines"]) / seconds,
        "ts_log_lines_per_s": (after["ts_log_lines"] - before["ts_log_lines"]) / seconds,
    }


def main(args: argparse.Namespace) -> list[dict]:
    images = load_images(args.images, 64)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    runs = []
    with tempfile.TemporaryDirectory(prefix="koa-logcfg-") as tmp:
        settings = [("built-in", builtin_log_config(Path(tmp) / "log4j2.xml")), ("log4j2.xml", ts.LOG_CONFIG)]
        for k in range(args.rounds):
            for label, path in settings if k % 2 == 0 else settings[::-1]:
                runs.append({"round": k + 1, **run_one(label, path, images, args)})
                r = runs[-1]
                print(f"round {k + 1}, {label}: {r['rps']:.1f} req/s, Java {r['cores_java']:.2f} cores", flush=True)
    config = {"rounds": args.rounds, "seconds": args.seconds, "clients": args.clients}
    result = {"started": started, "config": config, "runs": runs}
    print(logging_report(result))
    write_result(args.json, result)
    return runs
