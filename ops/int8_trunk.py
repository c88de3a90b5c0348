"""``make int8-trunk``: measure the int8 trunk's table on training knees, then check it as served.

1. The activation ranges of the grader's ResNet trunk (`model.quantize.calibrate`) on ``--images``
   training knees drawn at random (seeded) from the train split -> ``weights/oamen.int8.json``.
2. Every image of val, site2 (checking only), the non-knee radiographs and the leg films through the
   handler's request path (`handler.service.Predictor`: finder, knee gate, grader, decoding), once in
   float32 and once with the int8 trunk: how many answers differ (status, grade, refusal reason, per
   knee for films) and by how much the probabilities move.
3. Speed side by side, in alternating rounds: the request path at batch 8 and 1, and the model alone.
-> docs/results/int8_trunk.json. Needs the data sets (../shared/data); about 6 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import random
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from handler.service import Predictor
from model.decode import decode_image
from model.paths import KOA, ROOT
from model.precision import compiled
from model.preprocess import preprocess
from model.quantize import COMMITTED, calibrate, with_int8_trunk
from ops.bench.common import load_predictor
from ops.results import DOC_RESULTS, write_result
from ops.served_check import compare_answers, ratios, speed_rounds

TABLE = ROOT / COMMITTED


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "build" / "oamen.pt", help="the exported model")
    p.add_argument("--images", type=int, default=256, help="training knees the ranges are measured on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--table", type=Path, default=TABLE)
    p.add_argument("--rounds", type=int, default=4, help="alternating speed rounds")
    p.add_argument("--seconds", type=float, default=6.0, help="measured seconds per speed point")
    p.add_argument("--json", type=Path, default=DOC_RESULTS / "int8_trunk.json")
    return p


def training_batches(contract, n: int, seed: int, batch: int = 32) -> list[torch.Tensor]:
    files = sorted((KOA / "train").glob("*/*.png"))
    if not files:
        raise SystemExit(f"no training knees under {KOA / 'train'}: the ranges are measured on them")
    chosen = random.Random(seed).sample(files, min(n, len(files)))
    x = np.stack([preprocess(decode_image(f.read_bytes()), contract) for f in tqdm(chosen, desc="calibration knees")])
    t = torch.from_numpy(x)
    return [t[i : i + batch] for i in range(0, len(t), batch)]


def gate_shift(fp32: Predictor, int8: Predictor) -> dict:
    """How the knee gate's score of each val knee moves, against the threshold it is compared with."""
    c = fp32.contract
    files = sorted((KOA / "val").glob("*/*.png"))
    x = torch.from_numpy(np.stack([preprocess(decode_image(f.read_bytes()), c) for f in files]))
    scores = {}
    for label, pred in (("float32", fp32), ("int8", int8)):
        scores[label] = np.concatenate(
            [
                pred.outputs(x[i : i + 32].contiguous(memory_format=torch.channels_last))["gate_scores"]
                for i in range(0, len(x), 32)
            ]
        )
    shift = scores["int8"] - scores["float32"]
    q = [0.5, 0.99, 1.0]
    return {
        "knees": len(files),
        "threshold": c.postprocess.gate_threshold,
        "shift": {"mean": float(shift.mean()), "min": float(shift.min()), "max": float(shift.max())},
        "score_quantiles": {"q": q, **{k: np.quantile(v, q).round(3).tolist() for k, v in scores.items()}},
    }


def main(args: argparse.Namespace) -> dict:
    fp32 = load_predictor(args.model, int8=False)
    contract = fp32.contract
    table = calibrate(fp32.eager, training_batches(contract, args.images, args.seed))
    table["measured_on"] = f"{table['images']} train-split knees, seed {args.seed}"
    args.table.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {args.table}: {len(table['ranges'])} activation ranges")
    example = torch.zeros(1, contract.channels, contract.input_size, contract.input_size)
    fast = compiled(with_int8_trunk(fp32.eager, table), example)
    int8 = Predictor(fast, fp32.eager, contract, torch.device("cpu"), fp32.finder)
    result = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "model": {"name": contract.model_name, "version": contract.model_version},
        "machine": platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "table": {
            "path": str(args.table.relative_to(ROOT)),
            "images": table["images"],
            "seed": args.seed,
            "activations": len(table["ranges"]),
        },  # fmt: skip
        "answers": compare_answers({"float32": fp32, "int8": int8}),
        "val_gate_scores": gate_shift(fp32, int8),
        "speed": speed_rounds({"float32": fp32, "int8": int8}, "format", args.rounds, args.seconds),
    }
    result["speed"]["ratio_int8_over_float32"] = ratios(result["speed"]["median"], "int8", "float32")
    write_result(args.json, result)
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
