"""What the grader's metrics cost: the request path with and without them, in alternating rounds.

``python -m ops.bench metrics [--rounds 8] [--batches 4] [--batch 16]`` (``make bench-metrics``): in one
process, on the same batches of val knees, the plain request path against the observed one (telemetry,
drift reference, TorchServe's metric lines). What it reports: docs/MONITORING.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from handler.memory import keep_freed_memory
from handler.metrics import ObservedPredictor, Telemetry, TorchServeSink, image_statistics, knee_records
from handler.service import Predictor
from model.checkpoint import load_torchscript
from model.drift import DriftReference
from model.localize import load_serving_finder
from model.paths import ROOT
from model.precision import served_models
from ops.load import image_bodies
from ops.results import DATA_IMAGES, DOC_RESULTS, write_result


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=Path, default=DATA_IMAGES)
    p.add_argument("--model", type=Path, default=ROOT / "build" / "oamen.pt")
    p.add_argument("--finder", type=Path, default=ROOT / "weights" / "finder.pt")
    p.add_argument("--reference", type=Path, default=ROOT / "weights" / "oamen.drift.json")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=4, help="batches per leg")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--json", type=Path, default=DOC_RESULTS / "bench_metrics.json")
    return p


def main(args: argparse.Namespace) -> dict:
    keep_freed_memory()
    scripted, contract = load_torchscript(args.model)
    cpu = torch.device("cpu")
    eager, fast, dtype = served_models(scripted, contract, cpu)
    finder = load_serving_finder(args.finder, cpu, dtype)
    # TorchServe's metrics cache, as a worker builds it, writing its [METRICS] lines where a worker would
    cache = MetricsCacheYamlImpl(config_file_path=str(ROOT / "deploy" / "monitoring" / "ts_metrics.yaml"))
    cache.initialize_cache()
    cache.model_name = "oamen"
    sink_log = logging.getLogger("ts.metrics.caching_metric")
    sink_log.setLevel(logging.INFO)
    sink_log.addHandler(logging.StreamHandler(open(os.devnull, "w")))  # lives as long as the run
    sink_log.propagate = False
    telemetry = Telemetry(TorchServeSink(cache, "oamen"), contract, DriftReference.load(args.reference))
    plain = Predictor(fast, eager, contract, cpu, finder)
    observed = ObservedPredictor(fast, eager, contract, cpu, finder, telemetry=telemetry)
    bodies = image_bodies(args.images, args.batch * args.batches)
    batches = [bodies[i : i + args.batch] for i in range(0, len(bodies), args.batch)]

    def leg(pred: Predictor, observe: bool) -> tuple[float, float]:
        """(images/s, CPU ms per batch, all threads) of one pass over the batches."""
        t0, c0 = time.perf_counter(), time.process_time()
        for batch in batches:
            rows = [{"body": b} for b in batch]
            if observe:
                telemetry.begin_batch()
            answers = pred.handle(rows, [{}] * len(rows))
            if observe:
                telemetry.end_batch(dict(enumerate(answers)))
        cpu_ms = (time.process_time() - c0) * 1000 / len(batches)
        return sum(map(len, batches)) / (time.perf_counter() - t0), cpu_ms

    leg(plain, False), leg(observed, True)  # warm-up of both
    rounds = []
    for r in range(args.rounds):
        order = [(plain, False), (observed, True)] if r % 2 == 0 else [(observed, True), (plain, False)]
        legs = {("observed" if obs else "plain"): leg(pred, obs) for pred, obs in order}
        rounds.append(
            {k: round(v[0], 2) for k, v in legs.items()}
            | {f"{k}_cpu_ms_per_batch": round(v[1], 1) for k, v in legs.items()}
            | {"ratio": round(legs["observed"][0] / legs["plain"][0], 4)}
        )
        logging.info("round %d: %s", r, rounds[-1])
    ratios = [r["ratio"] for r in rounds]
    # The telemetry alone, on a batch of the contract's shape (its cost does not depend on the pixels):
    # CPU time is far steadier than throughput on a machine shared with other work.
    alone = Telemetry(TorchServeSink(cache, "oamen"), contract, telemetry.reference)
    x = torch.randn(args.batch, contract.channels, contract.input_size, contract.input_size)
    probs = np.random.default_rng(0).dirichlet(np.ones(contract.num_classes), args.batch)
    arrays = {
        "probabilities": probs,
        "confidence": probs.max(1),
        "gate_scores": np.zeros(args.batch),
        "refused": np.zeros(args.batch, bool),
    }
    answers = {i: (200, {"kl_grade": int(probs[i].argmax()), "uncertain": False}) for i in range(args.batch)}

    def telemetry_batch() -> None:
        alone.begin_batch()
        for mark in ("finder_start", "finder_end", "grader_start", "grader_end"):
            alone.mark(mark)
        alone.add_knees(knee_records(arrays, image_statistics(x)))
        alone.end_batch(answers)

    for _ in range(20):
        telemetry_batch()
    c0 = time.process_time()
    for _ in range(200):
        telemetry_batch()
    telemetry_cpu_ms = (time.process_time() - c0) * 1000 / 200
    plain_cpu = statistics.median(r["plain_cpu_ms_per_batch"] for r in rounds)
    result = {
        "what": "images/s of the in-process request path, observed (metrics + drift window) / plain",
        "model": f"{contract.model_name} {contract.model_version}",
        "batch": args.batch,
        "images_per_leg": sum(map(len, batches)),
        "rounds": rounds,
        "median_ratio": round(statistics.median(ratios), 4),
        "telemetry_cpu_ms_per_batch": round(telemetry_cpu_ms, 2),
        "plain_cpu_ms_per_batch": round(plain_cpu, 1),
        "telemetry_cpu_share": round(telemetry_cpu_ms / plain_cpu, 4),
        "min_ratio": min(ratios),
        "max_ratio": max(ratios),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    write_result(args.json, result)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(get_args_parser().parse_args())
