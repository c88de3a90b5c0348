"""OA-MEN against the paper's baselines under one protocol and one budget (the paper's Table 2).

``python -m train.compare --data ../shared/data/koa --out reports/compare [--quick]``

Every model is trained by `train.fit` with the same arguments (protocol, epochs, time limit,
augmentation, loss, seed), then its best checkpoint is evaluated on val by `train.evaluate`,
and its size and CPU speed are measured side by side by `train.bench_model`. Writes
``compare.md`` and ``compare.json`` (plus each model's run folder with its training curves,
confusion matrix and ROC curves). ``--quick`` is a reduced budget for a quick look; the table
says so in its first line, and its numbers are not comparable to a full run.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from model import list_models
from train.data import PROTOCOLS
from train.model_speed import benchmark

log = logging.getLogger("train.compare")

PAPER_MODELS = ["oamen", "xception", "mobilenet_v2", "resnet18", "densenet121", "nasnet"]
ABLATIONS = ["oamen_nofusion", "oamen_nomobile"]
QUICK = {"epochs": 1, "max_train_per_epoch": 64, "max_val": 100, "input_size": 64}
METRICS = ["accuracy", "balanced_accuracy", "macro_f1", "qwk", "mae", "macro_auc", "mean_ovr_accuracy"]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train and compare OA-MEN with the paper's baselines.")
    p.add_argument("--models", nargs="+", default=PAPER_MODELS, choices=list_models())
    p.add_argument("--ablations", action="store_true", help=f"also train {ABLATIONS}")
    p.add_argument("--data", default="../shared/data/koa")
    p.add_argument("--protocol", default="official", choices=PROTOCOLS)
    p.add_argument("--out", default="reports/compare")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--time-limit", type=float, default=0.0, help="minutes per model (0: none); enforced by train.fit")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--max-train-per-epoch", type=int, default=None)
    p.add_argument("--max-val", type=int, default=None)
    p.add_argument("--balance", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--loss", default="ordinal", choices=("ce", "ordinal"))
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help=f"reduced budget for a quick look: {QUICK}")
    p.add_argument("--no-speed", dest="speed", action="store_false", help="skip the CPU speed measurement")
    p.add_argument("--tune-fraction", type=float, default=0.1, help="as train.fit's (0: the data has no tune fold)")
    p.add_argument(
        "--no-eval",
        dest="eval",
        action="store_false",
        help="report the best epoch's val metrics as train.fit measured them (on its device) instead of "
        "re-running train.evaluate on the CPU (slow for the largest baselines on a GPU machine)",
    )
    p.add_argument("--no-save-last", dest="save_last", action="store_false", help="passed to train.fit")
    p.add_argument("--cache-dir", default="cache", help="passed to train.fit (one per concurrent compare)")
    return p


def fit_args(args: argparse.Namespace, name: str, out: Path) -> list[str]:
    """train.fit arguments for one model: the shared budget, only the model and folder differ."""
    argv = [
        "--model", name, "--data", args.data, "--protocol", args.protocol, "--out", str(out),
        "--epochs", str(args.epochs), "--time-limit", str(args.time_limit), "--batch-size", str(args.batch_size),
        "--lr", str(args.lr), "--input-size", str(args.input_size), "--loss", args.loss,
        "--workers", str(args.workers), "--device", args.device, "--seed", str(args.seed), "--patience", "0",
        "--balance" if args.balance else "--no-balance", "--tune-fraction", str(args.tune_fraction),
        "--save-last" if args.save_last else "--no-save-last", "--cache-dir", args.cache_dir,
    ]  # fmt: skip
    if args.max_train_per_epoch:
        argv += ["--max-train-per-epoch", str(args.max_train_per_epoch)]
    if args.max_val:
        argv += ["--max-val", str(args.max_val)]
    return argv


def run_command(module: str, argv: list[str]) -> None:
    """``python -m MODULE ARGV...`` in a child process (a command runs other commands, never imports them)."""
    subprocess.run([sys.executable, "-m", module, *argv], check=True)


def markdown_table(rows: list[dict[str, Any]], header: str) -> str:
    cols = ["model", *METRICS, "params_m", "gflops", "cpu_ips_b1", "cpu_ips_b16", "train_minutes", "epochs_run"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("n/a" if v is None else f"{v:.4f}" if isinstance(v, float) and c in METRICS else
                         f"{v:.2f}" if isinstance(v, float) else str(v))  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    names = list(dict.fromkeys(args.models + (ABLATIONS if args.ablations else [])))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        run = out / name
        t0 = time.monotonic()
        run_command("train.fit", fit_args(args, name, run))
        minutes = (time.monotonic() - t0) / 60
        history = json.loads((run / "history.json").read_text())
        if args.eval:
            run_command(
                "train.evaluate",
                ["--checkpoint", str(run / "best.pt"), "--data", args.data, "--split", "val", "--protocol",
                 args.protocol, "--seed", str(args.seed), "--out", str(run / "eval-val")],
            )  # fmt: skip
            metrics = json.loads((run / "eval-val" / "metrics.json").read_text())
        else:
            metrics = json.loads((run / "best_metrics.json").read_text())
        rows.append({"model": name, **{m: metrics[m] for m in METRICS}, "train_minutes": round(minutes, 1),
                     "epochs_run": len(history), "per_class": metrics["per_class"]})  # fmt: skip
    if args.speed:
        for row, bench in zip(rows, benchmark(names, args.input_size, (1, 16), rounds=2, min_seconds=0.5), strict=True):
            row.update(params_m=bench["params_m"], gflops=bench["gflops"], cpu_ips_b1=bench["ips_b1"],
                       cpu_ips_b16=bench["ips_b16"])  # fmt: skip
    budget = (
        f"protocol {args.protocol}, {args.epochs} epochs max, time limit {args.time_limit or 'none'} min/model, "
        f"input {args.input_size} px, balance {args.balance}, loss {args.loss}, seed {args.seed}"
    )
    quick = "**REDUCED BUDGET (--quick): a smoke run, not a result.** " if args.quick else ""
    header = f"{quick}Budget: {budget}. Metrics on val; speed on this machine's CPU (TorchScript, inference mode)."
    (out / "compare.md").write_text(markdown_table(rows, header))
    (out / "compare.json").write_text(json.dumps({"quick": args.quick, "budget": budget, "rows": rows}, indent=2))
    print(markdown_table(rows, header))
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
