"""Parameters, GFLOPs and CPU images/s of registered models, timed side by side.

Used by `train.bench_model` (``make bench-model``) and `train.compare` (the paper's Table 2).
Models are timed in interleaved rounds (the best round is kept), so background load on a shared
machine affects them alike and ratios stay fair.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from model import create_model


def count_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def count_gflops(net: nn.Module, input_size: int, in_chans: int = 1) -> float:
    """FLOPs of one forward pass on one image, in units of 1e9 (multiply-add = 2 FLOPs)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        net.eval()(torch.zeros(1, in_chans, input_size, input_size))
    return counter.get_total_flops() / 1e9


def _time_once(fn: torch.jit.ScriptModule, x: torch.Tensor, min_seconds: float) -> float:
    """Images per second of ``fn`` on ``x``, repeating for at least ``min_seconds``."""
    n, start = 0, time.perf_counter()
    while True:
        fn(x)
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return n * x.shape[0] / elapsed


def benchmark(
    names: list[str],
    input_size: int = 224,
    batches: tuple[int, ...] = (1, 16),
    rounds: int = 3,
    min_seconds: float = 1.0,
) -> list[dict]:
    """Rows of {model, params_m, gflops, ips_b<batch>...} for ``names``, timed side by side."""
    rows, traced = {}, {}
    for name in tqdm(names, desc="build", leave=False):
        net = create_model(name).eval()
        rows[name] = {"model": name, "params_m": count_params(net) / 1e6, "gflops": count_gflops(net, input_size)}
        with torch.inference_mode():
            traced[name] = torch.jit.trace(net, torch.zeros(1, 1, input_size, input_size))
    with torch.inference_mode():
        for b in batches:
            x = torch.randn(b, 1, input_size, input_size)
            for name in names:
                traced[name](x)  # warm-up (TorchScript optimises on the first calls)
            best = dict.fromkeys(names, 0.0)
            for _ in tqdm(range(rounds), desc=f"batch {b}", leave=False):
                for name in names:
                    best[name] = max(best[name], _time_once(traced[name], x, min_seconds))
            for name in names:
                rows[name][f"ips_b{b}"] = best[name]
    return [rows[n] for n in names]
