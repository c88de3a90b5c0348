"""Evaluate a checkpoint or an exported TorchScript model on one split of a dataset.

``python -m train.evaluate --torchscript weights/oamen.pt --data ../shared/data/koa --split val --out DIR``

Writes into ``DIR``: ``metrics.json`` (see `train.metrics.compute_metrics`, plus what was
evaluated, the top-label ``ece`` and the uncertain flag's figures), ``predictions.csv`` (one row
per image: file, true grade, predicted grade, the probabilities, confidence, flag),
``confusion_matrix.png`` and ``roc.png`` (as in the OA-MEN paper's Figure 4), ``reliability.png``
(calibration) and ``selective.png`` / ``selective.json`` (accuracy against the share of answers
kept, most confident first). With ``--framing``, ``framing.json``: the same knees framed as other
hospitals frame them (`FRAMINGS`). With ``--nonknee DIR``, ``gate.json``: what the knee gate
refuses among real knees, real non-knee radiographs and made-up negatives.
The transform and the answer (`model.postprocess`) are rebuilt from the contract stored in the
file, exactly as the server does.
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

import cv2
import numpy as np
import torch
from tqdm import tqdm

from model.checkpoint import load_torchscript, model_from_checkpoint
from model.contract import InputContract
from model.decode import decode_image
from model.paths import KOA
from model.postprocess import finish
from model.precision import compiled, serving_dtype
from model.preprocess import as_float_image, prepare, to_model_input
from train.data import IMAGE_SUFFIXES, PROTOCOLS, Sample, make_splits, prepare_all, scan
from train.metrics import compute_metrics, quadratic_weighted_kappa, reliability_bins
from train.plots import plot_confusion_matrix, plot_reliability, plot_roc_curves, plot_selective

log = logging.getLogger("train.evaluate")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a checkpoint or TorchScript model on a dataset split.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a checkpoint written by train.fit")
    src.add_argument("--torchscript", help="a TorchScript file written by train.export")
    p.add_argument("--data", default=str(KOA), help="dataset root")
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


# The same knees framed as other hospitals frame them, applied to the decoded image before the
# preprocessing: (name, what it is, function of a float [0, 1] image).
def _band(image: np.ndarray, share: float = 0.55) -> np.ndarray:
    h = image.shape[0]
    keep = max(1, round(h * share))
    top = (h - keep) // 2
    return image[top : top + keep, :]


def _zoom(image: np.ndarray, share: float = 0.85) -> np.ndarray:
    h, w = image.shape
    kh, kw = max(1, round(h * share)), max(1, round(w * share))
    top, left = (h - kh) // 2, (w - kw) // 2
    return image[top : top + kh, left : left + kw]


FRAMINGS = (
    ("original", "the dataset's crop", lambda im: im),
    ("joint_band_55", "full width, the central 55% of the height (a wide image, letterboxed)", _band),
    ("zoom_85", "the central 85% of each side, enlarged back", _zoom),
    ("gamma_0.7", "brightness curve gamma 0.7", lambda im: np.power(im, 0.7)),
    ("gamma_1.4", "brightness curve gamma 1.4", lambda im: np.power(im, 1.4)),
)


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


@torch.inference_mode()
def model_outputs(
    net: torch.nn.Module, images: np.ndarray, contract: InputContract, flip: bool = False, batch_size: int = 32
) -> np.ndarray:
    """(N, S, S) prepared uint8 images -> (N, K) logits, or (N, K + 1) with the knee gate's score."""
    gated = hasattr(net, "forward_with_gate")
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="evaluate", leave=False, dynamic_ncols=True):
        chunk = images[i : i + batch_size]
        if flip:
            chunk = chunk[:, :, ::-1]
        x = torch.from_numpy(np.stack([to_model_input(np.ascontiguousarray(im), contract) for im in chunk]))
        x = x.contiguous(memory_format=torch.channels_last)
        out.append((net.forward_with_gate(x) if gated else net(x)).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, contract.num_classes), np.float32)


def answer_arrays(
    net: torch.nn.Module, contract: InputContract, images: np.ndarray, batch_size: int = 32
) -> dict[str, np.ndarray | None]:
    """The answers the server would give for prepared images (`model.postprocess.finish`)."""
    outputs = model_outputs(net, images, contract, batch_size=batch_size)
    flipped = model_outputs(net, images, contract, True, batch_size) if contract.postprocess.flip_tta else None
    return finish(outputs, contract.postprocess, contract.num_classes, flipped)


def evaluate_model(
    net: torch.nn.Module,
    contract: InputContract,
    samples: list[Sample],
    batch_size: int = 32,
    cache_dir: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,), probabilities (N, K)) for ``samples``, in their order, as served."""
    images = prepare_all(samples, contract, cache_dir or None, desc="eval")
    answers = answer_arrays(net, contract, images, batch_size)
    return np.array([s.grade for s in samples]), answers["probabilities"]


def prepare_files(paths: list[Path], contract: InputContract, transform=None) -> np.ndarray:
    """Decode and prepare image files (optionally transformed first, on the [0, 1] float image)."""
    out = []
    for p in paths:
        image = as_float_image(decode_image(p.read_bytes(), max_pixels=contract.max_pixels))
        out.append(prepare(transform(image) if transform else image, contract))
    return np.stack(out)


def framing_table(
    net: torch.nn.Module, contract: InputContract, samples: list[Sample], batch_size: int
) -> list[dict[str, Any]]:
    """Top-1, QWK and agreement with the original's grade, for each of `FRAMINGS`."""
    labels = np.array([s.grade for s in samples])
    paths = [s.path for s in samples]
    rows, original = [], None
    for name, what, fn in FRAMINGS:
        grades = answer_arrays(net, contract, prepare_files(paths, contract, fn), batch_size)["grades"]
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


def made_up_negatives(knees: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Prepared images that are not knee crops, made from what is at hand (no file needed).

    knees upside down; the femur shaft only (the top 40% of a knee crop, the joint cut off);
    uniform and smoothed noise; a page of text; flat gray.
    """
    rng = np.random.default_rng(seed)
    size = knees.shape[1]
    noise = rng.integers(0, 256, (40, size, size), dtype=np.uint8)
    smooth = np.stack([cv2.GaussianBlur(n, (0, 0), 6) for n in noise[:20]])
    page = np.full((20, size, size), 235, np.uint8)
    for i in range(len(page)):
        for row in range(12, size, 14):
            words = "".join(rng.choice(list("abcdefghij klmnop qrstuv wxyz"), 30))
            cv2.putText(page[i], words, (4, row), cv2.FONT_HERSHEY_SIMPLEX, 0.35, 20, 1)
    flat = np.full((5, size, size), 128, np.uint8)
    shaft = np.zeros_like(knees[:40])
    for i, k in enumerate(knees[:40]):
        band = k[: int(size * 0.4)]
        shaft[i] = cv2.resize(band, (size, size), interpolation=cv2.INTER_LINEAR)
    return {
        "knee upside down": knees[:, ::-1, :].copy(),
        "femur shaft only (joint cut off)": shaft,
        "uniform noise": noise,
        "smoothed noise": smooth,
        "a page of text": page,
        "flat gray": flat,
    }


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
