"""Evaluate a checkpoint or an exported TorchScript model on one split of a dataset.

``python -m train.evaluate --torchscript weights/oamen.pt --data ../shared/data/koa --split val --out DIR``
The answer is rebuilt from the contract in the file, as the server does (`train.answers`). What it
writes: docs/TRAINING.md (`train.evaluate`).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.contract import InputContract
from model.precision import compiled, serving_dtype
from train.answers import FRAMINGS, answer_arrays, load_model, made_up_negatives, prepare_files, select_split
from train.data import IMAGE_SUFFIXES, PROTOCOLS, Sample, prepare_all, scan
from train.metrics import compute_metrics, quadratic_weighted_kappa, reliability_bins
from train.plots import plot_confusion_matrix, plot_reliability, plot_roc_curves, plot_selective

log = logging.getLogger("train.evaluate")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a checkpoint or TorchScript model on a dataset split.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a checkpoint written by train.fit")
    src.add_argument("--torchscript", help="a TorchScript file written by train.export")
    p.add_argument("--data", default="../shared/data/koa", help="dataset root")
    p.add_argument("--split", default="val", help="train, val, test, auto_test (or 'all' for a plain ROOT/<grade>/)")
    p.add_argument(
        "--protocol", default="official", choices=PROTOCOLS, help="how train/val are formed (see train.data)"
    )
    p.add_argument("--seed", type=int, default=0, help="split seed for the grouped and paper protocols")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cache-dir", default="cache", help="where prepared images are cached ('' to disable)")
    p.add_argument("--framing", action="store_true", help="also grade the knees framed as other hospitals do")
    p.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "bf16", "served"),
        help="number format of the network (model.precision); 'served': what the server picks on this machine",
    )
    p.add_argument("--nonknee", default=None, help="folder of non-knee radiographs to measure the knee gate on")
    return p


def framing_table(
    net: torch.nn.Module, contract: InputContract, samples: list[Sample], batch_size: int
) -> list[dict[str, Any]]:
    """Top-1, QWK and agreement with the original's grade, for each of `FRAMINGS`."""
    labels = np.array([s.grade for s in samples])
    paths = [s.path for s in samples]
    rows, original = [], None
    for framing in FRAMINGS:
        name, what = framing.name, framing.what
        grades = answer_arrays(net, contract, prepare_files(paths, contract, framing.apply), batch_size)["grades"]
        if original is None:
            original = grades
        rows.append(
            {
                "framing": name,
                "what": what,
                "n": len(labels),
                "accuracy": float((grades == labels).mean()),
                "qwk": quadratic_weighted_kappa(labels, grades, contract.num_classes),
                "agreement_with_original": float((grades == original).mean()),
            }
        )
        rows[-1]["qwk_drop"] = rows[0]["qwk"] - rows[-1]["qwk"]
        log.info("framing %-14s top-1 %.4f QWK %.4f agreement %.4f", name, rows[-1]["accuracy"], rows[-1]["qwk"],
                 rows[-1]["agreement_with_original"])  # fmt: skip
    return rows


def gate_table(
    net: torch.nn.Module, contract: InputContract, knees: np.ndarray, nonknee: Path, batch_size: int
) -> dict[str, Any]:
    """Share refused by the knee gate: real knees, real non-knee radiographs by region, made-up negatives."""

    def refused_share(images: np.ndarray) -> tuple[float, int]:
        r = answer_arrays(net, contract, images, batch_size)["refused"]
        if r is None:
            raise ValueError("this model has no knee gate (contract postprocess.gate is 'none')")
        return float(r.mean()), int(len(r))

    rows = []
    share, n = refused_share(knees)
    rows.append({"set": "val knees", "kind": "knee", "n": n, "refused": share})
    regions = sorted(d for d in nonknee.iterdir() if d.is_dir())
    for region in regions:
        files = sorted(p for p in region.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        share, n = refused_share(prepare_files(files, contract))
        rows.append({"set": f"non-knee radiographs: {region.name}", "kind": "radiograph", "n": n, "refused": share})
    for name, images in made_up_negatives(knees).items():
        share, n = refused_share(images)
        rows.append({"set": f"made up: {name}", "kind": "made_up", "n": n, "refused": share})
    radiographs = [r for r in rows if r["kind"] == "radiograph"]
    total = sum(r["n"] for r in radiographs)
    return {
        "threshold": contract.postprocess.gate_threshold,
        "rows": rows,
        "nonknee_radiographs_refused": sum(r["refused"] * r["n"] for r in radiographs) / total if total else None,
        "val_knees_refused": rows[0]["refused"],
    }


def selective_curve(labels: np.ndarray, grades: np.ndarray, conf: np.ndarray) -> list[dict[str, float]]:
    """Accuracy of the most confident answers against the share kept (coverage), in 5% steps."""
    order = np.argsort(-conf, kind="stable")
    correct = (grades == labels)[order]
    rows = []
    for cov in np.linspace(0.05, 1.0, 20):
        n = max(1, round(cov * len(labels)))
        rows.append({"coverage": round(float(n / len(labels)), 4), "accuracy": float(correct[:n].mean()),
                     "threshold": float(conf[order][n - 1])})  # fmt: skip
    return rows


def write_predictions(path: Path, samples: list[Sample], labels: np.ndarray, answers: dict[str, Any]) -> None:
    probs = answers["probabilities"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "grade", "predicted", *[f"p{k}" for k in range(probs.shape[1])], "confidence", "uncertain"])
        for i, (s, y) in enumerate(zip(samples, labels, strict=True)):
            w.writerow([str(s.path), int(y), int(answers["grades"][i]), *[f"{v:.6f}" for v in probs[i]],
                        f"{answers['confidence'][i]:.6f}", int(answers["uncertain"][i])])  # fmt: skip


def main(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    net, contract, source = load_model(args.checkpoint, args.torchscript)
    dtype = serving_dtype(torch.device("cpu"), None if args.precision == "served" else args.precision)
    if dtype != torch.float32:
        if args.torchscript:
            raise ValueError("--precision bf16 needs --checkpoint (the eager model is cast, then traced)")
        example = torch.zeros(1, contract.channels, contract.input_size, contract.input_size)
        net = compiled(net, example, dtype)
        source += f" in {str(dtype).removeprefix('torch.')}"
    samples = select_split(scan(args.data, contract.num_classes), args.split, args.protocol, args.seed)
    labels = np.array([s.grade for s in samples])
    images = prepare_all(samples, contract, args.cache_dir or None, desc="eval")
    answers = answer_arrays(net, contract, images, args.batch_size)
    probs, grades, conf = answers["probabilities"], answers["grades"], answers["confidence"]
    metrics = compute_metrics(labels, probs, contract.class_names, y_pred=grades)
    flagged = answers["uncertain"]
    kept = ~flagged
    metrics["uncertain"] = {
        "threshold": contract.postprocess.uncertain_below,
        "flagged_share": float(flagged.mean()),
        "accuracy_not_flagged": float((grades[kept] == labels[kept]).mean()) if kept.any() else None,
        "accuracy_flagged": float((grades[flagged] == labels[flagged]).mean()) if flagged.any() else None,
    }
    metrics["postprocess"] = contract.postprocess.__dict__ | {"cutpoints": list(contract.postprocess.cutpoints)}
    metrics["evaluated"] = {
        "source": source,
        "model_name": contract.model_name,
        "model_version": contract.model_version,
        "data": str(args.data),
        "split": args.split,
        "protocol": args.protocol,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_predictions(out / "predictions.csv", samples, labels, answers)
    title = f"{contract.model_name} v{contract.model_version}, {args.split} (n={len(labels)})"
    plot_confusion_matrix(
        np.asarray(metrics["confusion_matrix"]), contract.class_names, out / "confusion_matrix.png", title=title
    )
    plot_roc_curves(labels, probs, contract.class_names, out / "roc.png", title=title)
    plot_reliability(
        reliability_bins(labels, probs), out / "reliability.png", title=f"{title}, ECE {metrics['ece']:.3f}"
    )
    curve = selective_curve(labels, grades, conf)
    (out / "selective.json").write_text(json.dumps(curve, indent=2))
    plot_selective(curve, out / "selective.png", title=title)
    if args.framing:
        metrics["framing"] = framing_table(net, contract, samples, args.batch_size)
        (out / "framing.json").write_text(json.dumps(metrics["framing"], indent=2))
    if args.nonknee:
        metrics["gate"] = gate_table(net, contract, images, Path(args.nonknee), args.batch_size)
        (out / "gate.json").write_text(json.dumps(metrics["gate"], indent=2))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log.info(
        "%s on %s/%s: top-1 %.4f, QWK %.4f, macro AUC %s, ECE %.4f -> %s",
        source,
        args.data,
        args.split,
        metrics["accuracy"],
        metrics["qwk"],
        metrics["macro_auc"],
        metrics["ece"],
        out,
    )
    return metrics


if __name__ == "__main__":
    main(get_args_parser().parse_args())
