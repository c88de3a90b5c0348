"""The GPU run's results (scripts/gpu_run.sh): collected into one committed JSON, drawn, rendered.

``python -m ops.gpu_report collect --bench reports/gpu1/bench_gpu.json --runs reports/gpu2
[--png-val reports/gpu_eval]`` reads what the GPU machine sent back (the throughput JSON, the table of
runs and the runs' histories from ``runs.tgz`` unpacked into RUNS/runs) and the evaluations made here
on the lossless PNGs (`train.evaluate` of the weights that came back), and writes
``docs/results/gpu_run.json``. ``python -m ops.gpu_report plots`` draws ``docs/model/gpu_curves.png``
and ``docs/model/gpu_confusion.png`` from that file; `ops.render_docs` renders its tables into
docs/RESULTS.md (`compare_report`, `throughput_report`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ops.markdown import md_table
from ops.results import DOC_RESULTS, ROOT, write_result

RESULT = DOC_RESULTS / "gpu_run.json"
LABELS = {
    "oamen_pt_full": "OA-MEN, full-width trunk + ImageNet Lite0 branch",
    "oamen_pt": "OA-MEN, half-width trunk + ImageNet Lite0 branch (the served architecture)",
    "oamen_pt_nofusion": "ablation: OA-MEN without the multi-scale fusion",
    "efficientnet_lite0": "ablation: the ImageNet Lite0 branch alone",
    "xception": "Xception (from scratch)",
    "mobilenet_v2": "MobileNetV2 (from scratch)",
    "resnet18": "ResNet-18 (from scratch)",
    "densenet121": "DenseNet-121 (from scratch)",
    "nasnet": "NASNet-A Large (from scratch)",
}
KEEP = ("accuracy", "qwk", "macro_auc", "macro_f1", "ece")


def _kl1_recall(metrics: dict[str, Any]) -> float:
    return float(metrics["per_class"]["KL1"]["recall"])


def collect(bench: Path, runs: Path, png_val: Path | None, committed: Path) -> dict[str, Any]:
    table = json.loads((runs / "gpu_table.json").read_text())
    rows = []
    for r in table:
        folder = runs / "runs" / r["run"]
        history = json.loads((folder / "history.json").read_text())
        best = r["best_metrics"] or {}
        rows.append({
            "run": r["run"], "model": r["model"], "input_size": r["input_size"], "epochs_run": r["epochs_run"],
            "epochs_budget": r["epochs_budget"], "time_cap_min": r["time_cap_min"],
            "train_seconds": r["train_seconds"], "best_epoch": r["best_epoch"],
            "val_device": {"accuracy": r["val_acc"], "qwk": r["val_qwk"], "macro_auc": r["val_macro_auc"],
                           "macro_f1": r["val_macro_f1"],
                           "kl1_recall": _kl1_recall(best) if best else None},
            "confusion_matrix": best.get("confusion_matrix"),
            "history": [{k: h[k] for k in ("epoch", "train_acc", "val_acc", "val_qwk", "seconds")} for h in history],
        })  # fmt: skip
    png: dict[str, Any] = {}
    if png_val is not None:
        for m in sorted(png_val.glob("*/metrics.json")):
            metrics = json.loads(m.read_text())
            png[m.parent.name] = {**{k: metrics[k] for k in KEEP}, "kl1_recall": _kl1_recall(metrics)}
    shipped = json.loads(committed.read_text())
    log = (runs / "run.log").read_text().splitlines()
    return {
        "device": log[0].strip(),
        "software": log[1].strip(),
        "protocol": (
            "train split less the tune fold (5200 knees), val (826 knees), both re-encoded as JPEG quality 80 to fit "
            "the machine's 64 MiB upload; batch 64, AdamW lr 1e-3 (weight decay 0.05), 1 warm-up epoch then cosine "
            "annealed by step or by the time cap, whichever is further, bf16 autocast, ordinal loss, the same "
            "augmentation and seed; a budget of 30 epochs, each run capped in time; four streams of runs shared "
            "the GPU and the 16 cores; the best epoch by val QWK kept"
        ),
        "runs": rows,
        "png_val": png,
        "committed": {
            "name": f"{shipped['evaluated']['model_name']} {shipped['evaluated']['model_version']}",
            **{k: shipped[k] for k in KEEP},
            "kl1_recall": _kl1_recall(shipped),
        },
        "throughput": json.loads(bench.read_text()),
    }


def _f(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def compare_report(result: dict[str, Any]) -> str:
    runs = [
        [LABELS.get(r["model"], r["model"]), f"{r['input_size']} px", r["epochs_run"], f"{r['time_cap_min']:g}",
         f"{r['train_seconds']:.0f}", r["best_epoch"], f"{v['accuracy']:.1%}", f"{v['qwk']:.3f}", _f(v["macro_auc"]),
         _f(v["macro_f1"]), _f(v["kl1_recall"])]
        for r in sorted(result["runs"], key=lambda r: -r["val_device"]["qwk"])
        for v in [r["val_device"]]
    ]  # fmt: skip
    c = result["committed"]
    weights = [f"committed {c['name']} (CPU, 95 min)", *(f"GPU `{name}`" for name in result["png_val"])]
    scores = [c, *result["png_val"].values()]
    lines = [
        f"Device: {result['device']} ({result['software']}). Protocol: {result['protocol']}.",
        "",
        md_table(
            ["model", "input", "epochs run (of 30)", "cap (min)", "train s", "best epoch", "val top-1", "val QWK",
             "val macro AUC", "val macro F1", "KL1 recall"],
            runs,
        ),  # fmt: skip
        "",
        "Re-measured here on the lossless val PNGs with `train.evaluate` (uncalibrated, as trained), against the "
        "committed model (calibrated; temperature scaling does not change its grades):",
        "",
        md_table(
            ["weights", "val top-1", "val QWK", "val macro AUC", "val macro F1", "ECE", "KL1 recall"],
            (
                [w, f"{m['accuracy']:.1%}", f"{m['qwk']:.3f}", f"{m['macro_auc']:.3f}", f"{m['macro_f1']:.3f}",
                 f"{m['ece']:.3f}", f"{m['kl1_recall']:.3f}"]
                for w, m in zip(weights, scores, strict=True)
            ),
        ),  # fmt: skip
    ]
    return "\n".join(lines) + "\n"


def throughput_report(result: dict[str, Any]) -> str:
    t = result["throughput"]
    lines = [
        f"`python -m ops.bench gpu` on {t['device']}, torch {t['torch']}, {t['cpu_cores']} CPU cores "
        f"({t['workers']} worker processes), `{t['model']}` at {t['input_size']} px with its knee gate, the "
        f"finder at {t['finder_input_size']} px; random weights (speed does not depend on them).",
        "",
        "Models alone (random inputs already on the GPU), images/s:",
        "",
        "| dtype | CUDA graph | batch | grader + gate | finder |",
        "|---|---|---|---|---|",
    ]
    for r in t["models_alone"]:
        lines.append(
            f"| {r['dtype']} | {'yes' if r['cuda_graph'] else 'no'} | {r['batch']} | "
            f"{r['grader_images_per_s']:,.0f} | {r.get('finder_images_per_s', 0):,.0f} |"
        )
    steps = t["cpu_steps"]
    lines += [
        "",
        "CPU steps, one core: " + ", ".join(
            f"{k.replace('_', ' ')} {v['ms_per_image_one_core']:.2f} ms ({v['share_of_cpu_time']:.0%})"
            for k, v in steps.items()
        ) + f". All {t['workers']} workers together: {t['cpu_side_images_per_s']:,.0f} images/s "
        f"({t['cpu_side_images_per_s_estimate']:,.0f} if they scaled perfectly).",
        "",
        "The whole path (PNG bytes in, graded answers' arrays out), images/s:",
        "",
        "| dtype | batch | images/s | main process waiting for the workers |",
        "|---|---|---|---|",
    ]  # fmt: skip
    for r in t["whole_path"]:
        lines.append(f"| {r['dtype']} | {r['batch']} | {r['images_per_s']:,.0f} | {r['waiting_for_cpu_share']:.0%} |")
    return "\n".join(lines) + "\n"


def plots(result: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = sorted(result["runs"], key=lambda r: -r["val_device"]["qwk"])
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.8))
    for r in runs:
        h = r["history"]
        label = f"{r['model']} {r['input_size']}px"
        ax[0].plot([x["epoch"] for x in h], [x["val_qwk"] for x in h], label=label)
        ax[1].plot([x["epoch"] for x in h], [x["train_acc"] for x in h], label=label)
    ax[0].set(title="val QWK per epoch (GPU run)", xlabel="epoch", ylabel="QWK", ylim=(0, 0.9))
    ax[1].set(title="train accuracy per epoch", xlabel="epoch", ylabel="accuracy", ylim=(0.2, 1.0))
    ax[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    curves = out / "gpu_curves.png"
    fig.savefig(curves, dpi=90)
    plt.close(fig)

    with_cm = [r for r in runs if r["confusion_matrix"]]
    cols = 5
    fig, axes = plt.subplots((len(with_cm) + cols - 1) // cols, cols, figsize=(3.2 * cols, 3.2 * 2))
    for a in np.ravel(axes):
        a.axis("off")
    for a, r in zip(np.ravel(axes), with_cm, strict=False):
        cm = np.asarray(r["confusion_matrix"], dtype=float)
        a.axis("on")
        a.imshow(cm / np.maximum(cm.sum(1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                a.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7)
        a.set_title(f"{r['model']} {r['input_size']}px", fontsize=8)
        a.set_xlabel("predicted KL", fontsize=7)
        a.set_ylabel("true KL", fontsize=7)
        a.tick_params(labelsize=7)
    fig.tight_layout()
    confusion = out / "gpu_confusion.png"
    fig.savefig(confusion, dpi=90)
    plt.close(fig)
    return [curves, confusion]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--bench", type=Path, required=True)
    c.add_argument("--runs", type=Path, required=True, help="the run's folder: gpu_table.json, run.log, runs/")
    c.add_argument("--png-val", type=Path, default=None)
    c.add_argument("--committed", type=Path, default=ROOT / "docs" / "model" / "eval-val" / "metrics.json")
    sub.add_parser("plots")
    args = p.parse_args(argv)
    if args.cmd == "collect":
        write_result(RESULT, collect(args.bench, args.runs, args.png_val, args.committed))
        print(f"wrote {RESULT.relative_to(ROOT)}")
    else:
        for path in plots(json.loads(RESULT.read_text()), ROOT / "docs" / "model"):
            print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
