"""Evaluate a checkpoint or an exported TorchScript model on one split of a dataset.

``python -m train.evaluate --torchscript weights/oamen.pt --data ../shared/data/koa --split val --out DIR``

Writes into ``DIR``: ``metrics.json`` (see `train.metrics.compute_metrics`, plus what was
evaluated), ``predictions.csv`` (one row per image: file, true grade, predicted grade, the
probabilities), ``confusion_matrix.png`` and ``roc.png`` (as in the OA-MEN paper's Figure 4).
The transform is rebuilt from the contract stored in the file, exactly as the server does.
Evaluating the exported TorchScript gives the same numbers as its checkpoint: the shipped
artifact is what gets measured.
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
from torch.utils.data import DataLoader

from model.checkpoint import load_torchscript, model_from_checkpoint
from model.contract import InputContract
from train.data import PROTOCOLS, KneeDataset, Sample, make_splits, prepare_all, scan
from train.fit import predict_probs
from train.metrics import compute_metrics
from train.plots import plot_confusion_matrix, plot_roc_curves

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
    return p


def load_model(checkpoint: str | None, torchscript: str | None) -> tuple[torch.nn.Module, InputContract, str]:
    """The model in eval mode, its contract, and a description of what was loaded."""
    if torchscript:
        net, contract = load_torchscript(torchscript)
        return net, contract, f"torchscript:{torchscript}"
    net, contract = model_from_checkpoint(checkpoint)
    return net, contract, f"checkpoint:{checkpoint}"


def select_split(samples: list[Sample], split: str, protocol: str, seed: int) -> list[Sample]:
    if protocol == "official":
        chosen = [s for s in samples if s.split == split]
    else:
        chosen = make_splits(samples, protocol, seed).get(split, [])
    if not chosen:
        found = sorted({s.split for s in samples})
        raise ValueError(f"split {split!r} has no images under protocol {protocol!r}; splits found: {found}")
    return chosen


def evaluate_model(
    net: torch.nn.Module,
    contract: InputContract,
    samples: list[Sample],
    batch_size: int = 32,
    cache_dir: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,), probabilities (N, K)) for ``samples``, in their order."""
    images = prepare_all(samples, contract, cache_dir or None, desc="eval")
    ds = KneeDataset(images, [s.grade for s in samples], contract)
    return predict_probs(net, DataLoader(ds, batch_size, shuffle=False), torch.device("cpu"), show=True)


def write_predictions(path: Path, samples: list[Sample], labels: np.ndarray, probs: np.ndarray) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "grade", "predicted", *[f"p{k}" for k in range(probs.shape[1])]])
        for s, y, p in zip(samples, labels, probs, strict=True):
            w.writerow([str(s.path), int(y), int(p.argmax()), *[f"{v:.6f}" for v in p]])


def main(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    net, contract, source = load_model(args.checkpoint, args.torchscript)
    samples = select_split(scan(args.data, contract.num_classes), args.split, args.protocol, args.seed)
    labels, probs = evaluate_model(net, contract, samples, args.batch_size, args.cache_dir)
    metrics = compute_metrics(labels, probs, contract.class_names)
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
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_predictions(out / "predictions.csv", samples, labels, probs)
    title = f"{contract.model_name} v{contract.model_version}, {args.split} (n={len(labels)})"
    plot_confusion_matrix(
        np.asarray(metrics["confusion_matrix"]), contract.class_names, out / "confusion_matrix.png", title=title
    )
    plot_roc_curves(labels, probs, contract.class_names, out / "roc.png", title=title)
    log.info(
        "%s on %s/%s: top-1 %.4f, QWK %.4f, macro AUC %s, mean one-vs-rest accuracy %.4f -> %s",
        source,
        args.data,
        args.split,
        metrics["accuracy"],
        metrics["qwk"],
        metrics["macro_auc"],
        metrics["mean_ovr_accuracy"],
        out,
    )
    return metrics


if __name__ == "__main__":
    main(get_args_parser().parse_args())
