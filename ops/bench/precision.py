"""The server's number formats side by side: speed on this CPU, and what bfloat16 changes in the answers.

``python -m ops.bench precision [--json docs/results/bench_precision.json]`` (``make bench-precision``):
the speed of the grader and the finder in each form the server may run, the answers on val and the
finder's decisions in bfloat16 against float32. What each part measures: docs/BENCHMARKS.md ("Number format").
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from model.checkpoint import load_torchscript, model_from_checkpoint
from model.localize import find_joints, load_finder, plan, serving_finder
from model.paths import KOA, LEGFILMS, NONKNEE
from model.precision import compiled, native_bf16
from ops.results import ROOT, write_result
from train.answers import answer_arrays, prepare_files
from train.data import IMAGE_SUFFIXES, scan
from train.metrics import compute_metrics

FORMATS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", default=str(ROOT / "weights" / "oamen.ckpt"))
    p.add_argument("--exported", default=str(ROOT / "build" / "oamen.pt"), help="train.export's file ('' to skip)")
    p.add_argument("--finder", default=str(ROOT / "weights" / "finder.pt"))
    p.add_argument("--data", default=str(KOA))
    p.add_argument("--films", default=str(LEGFILMS))
    p.add_argument("--nonknee", default=str(NONKNEE))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--json", default=None)
    return p


def speed(runners: dict[str, tuple[Any, torch.Tensor]], rounds: int, seconds: float) -> dict[str, float]:
    """Images/s of each runner, median over interleaved rounds (shared-machine drift hits all alike)."""
    got: dict[str, list[float]] = {k: [] for k in runners}
    with torch.inference_mode():
        for fn, x in runners.values():
            for _ in range(3):
                fn(x)
        for _ in range(rounds):
            for k, (fn, x) in runners.items():
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < seconds:
                    fn(x)
                    n += 1
                got[k].append(n * x.shape[0] / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in got.items()}


def answers(nets: dict[str, torch.nn.Module], contract, data: Path) -> dict[str, Any]:
    samples = [s for s in scan(data, contract.num_classes) if s.split == "val"]
    labels = np.array([s.grade for s in samples])
    images = prepare_files([s.path for s in samples], contract)
    out: dict[str, Any] = {"n": len(samples)}
    grades = {}
    for name, net in nets.items():
        a = answer_arrays(net, contract, images)
        m = compute_metrics(labels, a["probabilities"], contract.class_names, y_pred=a["grades"])
        refused = a["refused"]
        out[name] = {
            "accuracy": m["accuracy"], "qwk": m["qwk"], "macro_auc": m["macro_auc"], "ece": m["ece"],
            "kl1_recall": m["per_class"]["KL1"]["recall"], "uncertain_share": float(a["uncertain"].mean()),
            "refused_share": float(refused.mean()) if refused is not None else 0.0,
        }  # fmt: skip
        grades[name] = a["grades"]
    out["grades_differ"] = int((grades["fp32"] != grades["bf16"]).sum())
    return out


def finder_decisions(finder: str, sets: dict[str, list[np.ndarray]]) -> dict[str, Any]:
    net, cfg = load_finder(finder)
    f32, f16 = serving_finder(net, cfg.input_size), serving_finder(net, cfg.input_size, dtype=torch.bfloat16)
    out = {}
    for name, grays in sets.items():
        differ, worst = 0, 0.0
        for g in grays:
            found_a, found_b = (find_joints(f, cfg, [g])[0] for f in (f32, f16))
            pa, pb = plan(found_a, g.shape, cfg), plan(found_b, g.shape, cfg)
            key = lambda p: (p.kind, p.error, [j.view for j in p.joints])  # noqa: E731
            differ += key(pa) != key(pb)
            # every joint found in both formats, graded or not (a box that narrows below the resolution
            # floor is a shift too): a float32 joint and the nearest bfloat16 one are the same joint when
            # their centres are within half a joint width (as model.localize.decode_output merges peaks);
            # a joint found in one format only changes a decision, counted above
            for ja in found_a:
                gap = lambda j, ja=ja: float(np.hypot(*np.subtract(j.centre, ja.centre)))  # noqa: E731
                near = [j for j in found_b if gap(j) < 0.5 * max(ja.width, j.width)]
                if near:
                    jb = min(near, key=gap)
                    worst = max(worst, float(np.abs(np.subtract(ja.box, jb.box)).max()) / max(ja.width, 1.0))
        out[name] = {"n": len(grays), "decisions_differ": differ, "worst_box_shift_of_width": worst}
    return out


def _images(folder: Path, limit: int | None = None) -> list[np.ndarray]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES - {".dcm"})[:limit]
    return [g for g in (cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in files) if g is not None]


def main(args: argparse.Namespace) -> dict[str, Any]:
    warnings.simplefilter("ignore", FutureWarning)
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    net, contract = model_from_checkpoint(args.weights)
    s = contract.input_size
    nets = {name: compiled(net, torch.zeros(1, contract.channels, s, s), dtype) for name, dtype in FORMATS.items()}
    fnet, cfg = load_finder(args.finder)
    finders = {"eager": fnet, **{n: serving_finder(fnet, cfg.input_size, dtype=d) for n, d in FORMATS.items()}}
    runners: dict[str, tuple[Any, torch.Tensor]] = {}
    for b in (1, 8):
        x = torch.randn(b, contract.channels, s, s).contiguous(memory_format=torch.channels_last)
        films = torch.randn(b, 1, cfg.input_size, cfg.input_size).contiguous(memory_format=torch.channels_last)
        if args.exported:
            runners[f"grader exported b{b}"] = (load_torchscript(args.exported)[0].forward_with_gate, x)
        for name, n in nets.items():
            runners[f"grader frozen {name} b{b}"] = (n.forward_with_gate, x)
        for name, f in finders.items():
            runners[f"finder {'eager fp32' if name == 'eager' else 'frozen ' + name} b{b}"] = (f, films)
    result: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "native_bf16": native_bf16(cpu),
        "torch": torch.__version__,
        "threads": args.threads,
        "rounds": args.rounds,
        "images_per_s": speed(runners, args.rounds, args.seconds),
    }
    print(result["images_per_s"], flush=True)
    result["val"] = answers(nets, contract, Path(args.data))
    print(result["val"], flush=True)
    sets = {"leg films": _images(Path(args.films)), "val crops": _images(Path(args.data) / "val", 300),
            "non-knee radiographs": _images(Path(args.nonknee))}  # fmt: skip
    result["finder_bf16_vs_fp32"] = finder_decisions(args.finder, sets)
    print(result["finder_bf16_vs_fp32"], flush=True)
    write_result(Path(args.json) if args.json else None, result)
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
