"""GPU throughput of the handler's request path, without TorchServe (the GPU machine has no Java).

``python -m ops.bench gpu --images gpu_stage/val --json $OUT/bench_gpu.json`` (on the GPU machine,
from scripts/gpu_run.sh; it runs on a CPU too, slowly, for a check): the models alone, the CPU steps, the
whole path with worker processes, and the whole path from several driving processes, each in one run.
The steps and what each part measures: docs/RESULTS.md ("GPU throughput of the request path").
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import platform
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from model import create_model
from model.checkpoint import model_from_checkpoint
from model.contract import InputContract
from model.decode import decode_image
from model.localize import FinderConfig, Letterbox, decode_output, finder_input, load_finder, plan, to_source
from model.preprocess import prepare, to_model_input

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=Path, required=True, help="a folder of knee crops (searched recursively)")
    p.add_argument("--max-images", type=int, default=1024, help="distinct images, cycled")
    p.add_argument("--model", default="oamen_pt")
    p.add_argument("--checkpoint", default=None, help="an eager checkpoint (default: random weights)")
    p.add_argument("--finder", default="weights/finder.pt", help="'' to leave the finder out")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--seconds", type=float, default=1.0, help="minimum time per model measurement")
    p.add_argument("--path-images", type=int, default=8192, help="images per whole-path measurement")
    p.add_argument("--workers", type=int, default=0, help="CPU processes for decode + preprocess (0: all cores)")
    p.add_argument(
        "--drivers",
        type=int,
        default=0,
        help="also run the whole path from this many processes at once, each with its own share of the "
        "workers and its own models on the GPU (0: skip)",
    )
    p.add_argument("--driver-batches", type=int, nargs="+", default=[64, 256], help="batch sizes for --drivers")
    p.add_argument("--json", default=None)
    return p


# ---- the CPU side, in worker processes ----------------------------------------------------------
_STATE: dict[str, Any] = {}


def _init_worker(contract_json: str, finder_size: int) -> None:
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    _STATE["contract"] = InputContract.from_json(contract_json)
    _STATE["finder_size"] = finder_size


def _cpu_steps(data: bytes) -> tuple[np.ndarray, tuple[float, int, int], tuple[int, int], np.ndarray]:
    """Decode, the finder's input and (the image being a crop) the grader's prepared image: what a
    worker does. Both images go back as uint8 (the finder's input is an equalised uint8 canvas
    scaled to [-1, 1]; the GPU scales it again)."""
    c = _STATE["contract"]
    gray = decode_image(data, max_pixels=c.max_pixels, knee_only=True)
    f_in, lb = finder_input(gray, _STATE["finder_size"])
    f_u8 = np.rint((f_in + 1.0) * 127.5).astype(np.uint8)
    return f_u8, (lb.scale, lb.left, lb.top), gray.shape, prepare(gray, c)


def step_times(blobs: list[bytes], contract: InputContract, finder_size: int, n: int = 200) -> dict[str, float]:
    """Seconds per image of each CPU step on one core (``to_model_input`` counted with the
    preprocessing, as the handler runs it)."""
    cv2.setNumThreads(1)
    out = {"decode": 0.0, "finder_input": 0.0, "preprocess": 0.0}
    for data in blobs[:n]:
        t0 = time.perf_counter()
        gray = decode_image(data, max_pixels=contract.max_pixels, knee_only=True)
        t1 = time.perf_counter()
        finder_input(gray, finder_size)
        t2 = time.perf_counter()
        to_model_input(prepare(gray, contract), contract)
        t3 = time.perf_counter()
        out["decode"] += t1 - t0
        out["finder_input"] += t2 - t1
        out["preprocess"] += t3 - t2
    return {k: v / min(n, len(blobs)) for k, v in out.items()}


# ---- the GPU side -------------------------------------------------------------------------------
class Runner:
    """A module at one batch size and dtype, eager or replayed from a captured CUDA graph."""

    def __init__(self, fn, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, graph: bool) -> None:
        self.fn, self.dtype, self.device = fn, dtype, device
        self.static = torch.zeros(shape, dtype=dtype, device=device).contiguous(memory_format=torch.channels_last)
        self.graph, self.error = None, None
        if graph and device.type == "cuda":
            try:
                self._capture(fn)
            except Exception as exc:  # measured eager instead, and said so
                self.graph, self.error = None, f"{type(exc).__name__}: {exc}"[:300]

    def _capture(self, fn) -> None:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), torch.inference_mode():
            for _ in range(3):
                fn(self.static)
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.out = fn(self.static)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            return self.fn(
                x.to(self.device, self.dtype, non_blocking=True).contiguous(memory_format=torch.channels_last)
            )
        self.static.copy_(x)
        self.graph.replay()
        return self.out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_model(runner: Runner, batch: int, seconds: float, device: torch.device) -> float:
    """Images/s of ``runner`` on a random batch already on the device."""
    x = torch.randn(runner.static.shape, device=device).to(runner.dtype).contiguous(memory_format=torch.channels_last)
    for _ in range(3):
        runner(x)
    _sync(device)
    n, t0 = 0, time.perf_counter()
    while True:
        runner(x)
        n += 1
        if n % 5 == 0:
            _sync(device)
            if time.perf_counter() - t0 >= seconds:
                break
    return n * batch / (time.perf_counter() - t0)


def cast(net: nn.Module, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A copy of ``net`` in ``dtype`` on ``device`` (``Module.to`` alone would change ``net`` itself).
    The knee gate's Mahalanobis distances stay in float32, as the gate computes them."""
    out = copy.deepcopy(net).to(device=device, dtype=dtype, memory_format=torch.channels_last).eval()
    if hasattr(out, "knee_gate"):
        out.knee_gate.float()
    return out


def load_blobs(folder: Path, limit: int) -> list[bytes]:
    """The folder's images, PNG-encoded in memory (what a client sends)."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})[:limit]
    if not files:
        raise SystemExit(f"no images under {folder}")
    blobs = []
    for f in files:
        ok, buf = cv2.imencode(".png", cv2.imread(str(f), cv2.IMREAD_GRAYSCALE))
        if not ok:
            raise SystemExit(f"could not encode {f}")
        blobs.append(buf.tobytes())
    return blobs


def _scale(u8: list[np.ndarray], device: torch.device, mean: float, std: float) -> torch.Tensor:
    """uint8 images -> (B, 1, S, S) float on the device: (x / 255 - mean) / std."""
    x = torch.from_numpy(np.stack(u8)).to(device, non_blocking=True)[:, None].float()
    return (x / 255.0 - mean) / std


def whole_path(
    pool, blobs: list[bytes], n: int, batch: int, grader: dict[int, Runner], finder: dict[int, Runner] | None,
    cfg: FinderConfig | None, contract: InputContract, device: torch.device,
) -> dict[str, float]:  # fmt: skip
    """Images/s end to end and the share of the time the main process waited for the workers."""
    chunk = max(1, min(32, batch))
    stream = pool.imap((_cpu_steps), (blobs[i % len(blobs)] for i in range(n)), chunksize=chunk)
    done, waited, graded, t0 = 0, 0.0, 0, time.perf_counter()
    while done < n:
        w0 = time.perf_counter()
        items = [next(stream) for _ in range(min(batch, n - done))]
        waited += time.perf_counter() - w0
        b = len(items)
        if finder is not None and cfg is not None:
            f_in = _scale([it[0] for it in items], device, 0.5, 0.5)  # [-1, 1], as finder_input
            out = finder[batch](_pad(f_in, batch))[:b].float().cpu().numpy()
            plans = []
            for o, it in zip(out, items, strict=True):
                joints = [to_source(p, Letterbox(*it[1])) for p in decode_output(o, cfg)]
                plans.append(plan(joints, it[2], cfg))
            keep = [i for i, pl in enumerate(plans) if pl.kind == "crop"]
        else:
            keep = list(range(b))
        if keep:
            x = _scale([items[i][3] for i in keep], device, contract.mean[0], contract.std[0])
            grader[batch](_pad(x, batch))[: len(keep)].float().cpu()
            graded += len(keep)
        done += b
    _sync(device)
    seconds = time.perf_counter() - t0
    return {"images_per_s": n / seconds, "seconds": seconds, "waiting_for_cpu_share": waited / seconds,
            "graded_as_crops": graded / n}  # fmt: skip


def _pad(x: torch.Tensor, batch: int) -> torch.Tensor:
    """A short last batch padded to the captured batch size (a graph has one shape)."""
    if x.shape[0] == batch:
        return x
    return torch.cat([x, x[:1].expand(batch - x.shape[0], *x.shape[1:])])


def build(args: argparse.Namespace) -> tuple[InputContract, nn.Module, nn.Module | None, FinderConfig | None]:
    """The grader (the checkpoint's, or random weights) and the finder, on the CPU."""
    if args.checkpoint:
        net, contract = model_from_checkpoint(args.checkpoint)
    else:
        torch.manual_seed(0)
        contract = InputContract(model_name=args.model, input_size=args.input_size, mean=(0.5,), std=(0.5,))
        net = create_model(args.model, num_classes=contract.num_classes, in_chans=contract.channels)
    finder_net, cfg = load_finder(args.finder) if args.finder else (None, None)
    return contract, net.eval(), finder_net, cfg


def _runners(
    grade_fn, finder_net: nn.Module | None, contract: InputContract, fsize: int, dtype: torch.dtype, batch: int,
    device: torch.device,
) -> tuple[dict[int, Runner], dict[int, Runner] | None]:  # fmt: skip
    """The grader and the finder captured as CUDA graphs at one batch size and dtype (eager on a CPU)."""
    shape = (batch, contract.channels, contract.input_size, contract.input_size)
    grader = {batch: Runner(grade_fn, shape, dtype, device, True)}
    finder = {batch: Runner(finder_net, (batch, 1, fsize, fsize), dtype, device, True)} if finder_net else None
    return grader, finder


def _driver(rank: int, args: argparse.Namespace, workers: int, conn, barrier) -> None:
    """One of ``--drivers`` processes: its own decode workers, its own models on the device; runs the
    whole path on command (dtype, batch, images) when every driver is ready, and sends the result."""
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    contract, net, finder_net, cfg = build(args)
    fsize = cfg.input_size if cfg is not None else 256
    blobs = load_blobs(args.images, args.max_images)
    blobs = blobs[rank::args.drivers] or blobs
    pool = mp.get_context("spawn").Pool(workers, _init_worker, (contract.to_json(), fsize))
    try:
        while (cmd := conn.recv()) is not None:
            name, batch, n = cmd
            m = cast(net, DTYPES[name], device)
            fn = m.forward_with_gate if hasattr(m, "forward_with_gate") else m
            f = cast(finder_net, DTYPES[name], device) if finder_net is not None else None
            grader, finder = _runners(fn, f, contract, fsize, DTYPES[name], batch, device)
            whole_path(pool, blobs, min(n, 2 * batch), batch, grader, finder, cfg, contract, device)  # warm
            barrier.wait()
            conn.send(whole_path(pool, blobs, n, batch, grader, finder, cfg, contract, device))
    finally:
        pool.close()
        pool.join()


def multi_driver_path(args: argparse.Namespace, workers: int) -> list[dict[str, Any]]:
    """The whole path from ``args.drivers`` processes at once, the workers shared out between them:
    the images/s of all of them together (all images over the slowest driver's time)."""
    k = args.drivers
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(k)
    pipes = [ctx.Pipe() for _ in range(k)]
    share = [workers // k + (1 if r < workers % k else 0) for r in range(k)]
    procs = [ctx.Process(target=_driver, args=(r, args, max(1, share[r]), pipes[r][1], barrier)) for r in range(k)]
    for pr in procs:
        pr.start()
    rows = []
    try:
        for name in args.dtypes:
            for b in args.driver_batches:
                n = max(b, min(args.path_images, 64 * b) // k)
                for parent, _ in pipes:
                    parent.send((name, b, n))
                results = [parent.recv() for parent, _ in pipes]
                seconds = max(r["seconds"] for r in results)
                row = {
                    "dtype": name, "batch": b, "drivers": k, "workers_per_driver": share,
                    "images_per_s": k * n / seconds, "seconds": seconds,
                    "per_driver_images_per_s": [r["images_per_s"] for r in results],
                    "waiting_for_cpu_share": [r["waiting_for_cpu_share"] for r in results],
                    "graded_as_crops": sum(r["graded_as_crops"] for r in results) / k,
                }  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        for parent, _ in pipes:
            parent.send(None)
        for pr in procs:
            pr.join(timeout=60)
            if pr.is_alive():
                pr.terminate()
    return rows


def main(args: argparse.Namespace) -> dict[str, Any]:
    workers = args.workers or os.cpu_count() or 1
    blobs = load_blobs(args.images, args.max_images)
    contract, net, finder_net, cfg = build(args)
    fsize = cfg.input_size if cfg is not None else 256
    # Spawned, not forked: a fork of a process whose torch, OpenCV or gRPC threads hold a lock can hang
    # (it did inside the test suite), and a forked child must not touch CUDA either.
    pool = mp.get_context("spawn").Pool(workers, _init_worker, (contract.to_json(), fsize))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_cores": os.cpu_count(), "workers": workers, "torch": torch.__version__, "model": args.model,
        "input_size": contract.input_size, "finder_input_size": fsize, "images": len(blobs),
    }  # fmt: skip
    grade_fn_of = {}
    for name, dtype in DTYPES.items():
        if name in args.dtypes:
            m = cast(net, dtype, device)
            grade_fn_of[name] = m.forward_with_gate if hasattr(m, "forward_with_gate") else m
    finder_of = {name: cast(finder_net, DTYPES[name], device) for name in args.dtypes} if finder_net else {}

    rows = []
    for name in args.dtypes:
        dtype = DTYPES[name]
        for graph in (False, True):
            for b in args.batches:
                g = Runner(grade_fn_of[name], (b, contract.channels, contract.input_size, contract.input_size),
                           dtype, device, graph)  # fmt: skip
                row = {"dtype": name, "cuda_graph": graph, "batch": b,
                       "grader_images_per_s": time_model(g, b, args.seconds, device)}  # fmt: skip
                if g.error:
                    row["grader_graph_error"] = g.error
                if finder_of:
                    f = Runner(finder_of[name], (b, 1, fsize, fsize), dtype, device, graph)
                    row["finder_images_per_s"] = time_model(f, b, args.seconds, device)
                    if f.error:
                        row["finder_graph_error"] = f.error
                rows.append(row)
                print(json.dumps(row), flush=True)
    result["models_alone"] = rows

    per_image = step_times(blobs, contract, fsize)
    total = sum(per_image.values())
    result["cpu_steps"] = {k: {"ms_per_image_one_core": v * 1e3, "share_of_cpu_time": v / total}
                           for k, v in per_image.items()}  # fmt: skip
    result["cpu_side_images_per_s_estimate"] = workers / total
    print(json.dumps(result["cpu_steps"]), flush=True)

    # The CPU side alone, on every worker: the ceiling the GPU cannot lift.
    n = min(args.path_images, 4 * len(blobs))
    t0 = time.perf_counter()
    for _ in pool.imap(_cpu_steps, (blobs[i % len(blobs)] for i in range(n)), chunksize=32):
        pass
    result["cpu_side_images_per_s"] = n / (time.perf_counter() - t0)
    print("cpu side alone:", round(result["cpu_side_images_per_s"]), "images/s", flush=True)

    paths = []
    for name in args.dtypes:
        dtype = DTYPES[name]
        for b in args.batches:
            grader, finder = _runners(grade_fn_of[name], finder_of.get(name), contract, fsize, dtype, b, device)
            count = min(args.path_images, max(64, 64 * b))
            row = {
                "dtype": name,
                "batch": b,
                **whole_path(pool, blobs, count, b, grader, finder, cfg, contract, device),
            }
            paths.append(row)
            print(json.dumps(row), flush=True)
    result["whole_path"] = paths
    pool.close()
    pool.join()
    if args.drivers:
        result["whole_path_drivers"] = multi_driver_path(args, workers)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
