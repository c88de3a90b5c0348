"""``make fusion-check``: what oneDNN Graph fusion changes in the served answers, and what it gains on this CPU.

1. Every image of val, site2 (checking only), the non-knee radiographs and the leg films through the
   handler's request path (`ops.served_check`) as served on this CPU (float32 with the int8 trunk, fused:
   `model.precision.onednn_fusion`) and as evaluation computes them (float32, not fused): how many answers
   differ and by how much the probabilities move.
2. The worker's warm-up at the shipped batch size (`handler.service.Predictor.warm_up`), fused and not:
   its seconds and the memory it adds.
3. Speed side by side, in alternating rounds, both with the int8 trunk: the request path at batch 8 and 1,
   and the model alone at batch 16 (8 knees and their mirrors).
-> docs/results/onednn_fusion.json. Needs the data sets (../shared/data); about 8 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
from pathlib import Path

import psutil
import torch

from handler.service import Predictor
from model.paths import ROOT
from ops.bench.common import cpu_name, load_predictor
from ops.results import DOC_RESULTS, write_result
from ops.served_check import compare_answers, ratios, speed_rounds

FUSED = {"float32": False, "served": True, "fused": True, "not fused": False}  # label -> fusion on


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "build" / "oamen.pt", help="the exported model")
    p.add_argument("--batch", type=int, default=8, help="the served batch size (config.properties)")
    p.add_argument("--rounds", type=int, default=4, help="alternating speed rounds")
    p.add_argument("--seconds", type=float, default=6.0, help="measured seconds per speed point")
    p.add_argument("--json", type=Path, default=DOC_RESULTS / "onednn_fusion.json")
    return p


def switch(label: str) -> None:
    """Set torch's process-wide fusion switch for the predictor ``label``: a graph is fused or not when it is
    optimised, on its first calls with a shape, so each predictor runs only with its own setting."""
    torch.jit.enable_onednn_fusion(FUSED[label])


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def warm_ups(preds: dict[str, Predictor], batch: int) -> dict[str, dict]:
    out = {}
    for label, pred in preds.items():
        switch(label)
        before = rss_mb()
        seconds = pred.warm_up(batch)
        out[label] = {"seconds": seconds, "rss_added_mb": rss_mb() - before}
        print(f"warm-up {label}: {seconds:.1f} s, {out[label]['rss_added_mb']:.0f} MB")
    return out


def main(args: argparse.Namespace) -> dict:
    # Each predictor is loaded, warmed and run with its own setting of the switch (`switch`).
    switch("fused")
    fused = load_predictor(args.model)
    switch("not fused")
    plain = load_predictor(args.model)
    contract = fused.contract
    both = {"fused": fused, "not fused": plain}
    result = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "model": {"name": contract.model_name, "version": contract.model_version},
        "machine": platform.machine(),
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "batch": args.batch,
        "warm_up": warm_ups(both, args.batch),
        "speed": speed_rounds(both, "fusion", args.rounds, args.seconds, switch, args.batch),
    }
    result["speed"]["ratio_fused_over_not"] = ratios(result["speed"]["median"], "fused", "not fused")
    del both, plain
    switch("float32")
    reference = load_predictor(args.model, int8=False)
    result["answers"] = compare_answers({"float32": reference, "served": fused}, switch)
    write_result(args.json, result)
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
