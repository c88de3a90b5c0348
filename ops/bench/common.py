"""What the benchmarks share: the handler's request path measured in-process, a private TorchServe for a run,
the cores a server and its load generator use, and the JIT warm-up of Java's frontend (docs/BENCHMARKS.md)."""

from __future__ import annotations

import contextlib
import os
import platform
import tempfile
import time
from pathlib import Path

import psutil
import torch

from handler.memory import keep_freed_memory
from handler.service import Predictor
from model.checkpoint import load_torchscript
from model.decode import decode_image
from model.localize import find_joints, load_serving_finder
from model.paths import ROOT
from model.precision import served_models
from model.preprocess import prepare, to_model_input
from model.quantize import COMMITTED, load_table
from ops import server as ts
from ops.load import drive

FINDER = ROOT / "weights" / "finder.pt"  # what `make archive` puts beside the model
INT8_TABLE = ROOT / COMMITTED  # the int8 trunk's table, as `make archive` packs it


def cpu_name() -> str:
    """The processor's model name, as /proc/cpuinfo gives it (the benchmarks' results name it)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def rate(fn, items_per_call: int, seconds: float, warm_calls: int = 3) -> float:
    """Items per second of ``fn()``, after ``warm_calls`` unmeasured calls, over at least ``seconds``.

    TorchScript optimises a graph on its first two calls with a shape, and with oneDNN Graph fusion
    compiles its kernels then (`model.precision.onednn_fusion`): timing those would measure compilation."""
    for _ in range(warm_calls):
        fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n * items_per_call / (time.perf_counter() - t0)


def load_predictor(model_path: Path, finder_path: Path = FINDER, int8: bool = True) -> Predictor:
    """The handler's request path (`handler.service.Predictor`) on CPU, from the exported model and the
    knee-joint finder the archive ships (and, with ``int8``, its int8 trunk table, `model.quantize`), with
    the worker's malloc settings (`handler.memory`), so in-process and served run the same way."""
    keep_freed_memory()
    scripted, contract = load_torchscript(model_path)
    cpu = torch.device("cpu")
    table = load_table(INT8_TABLE) if int8 else None
    eager, fast, dtype = served_models(scripted, contract, cpu, table)  # as `handler.koa_handler` builds them
    return Predictor(fast, eager, contract, cpu, load_serving_finder(finder_path, cpu, dtype))


def pipeline_rate(pred: Predictor, images: list[bytes], batch: int, seconds: float) -> float:
    """Images/s of the whole request path (decode, preprocess, batch, model) on batches of ``batch``."""
    rows = [{"body": images[i % len(images)]} for i in range(batch)]
    return rate(lambda: pred.handle(rows, [{}] * batch), batch, seconds)


def in_process(model_path: Path, images: list[bytes], batch: int, seconds: float) -> dict:
    pred = load_predictor(model_path)
    scripted, contract = pred.scripted, pred.contract
    rows = [{"body": images[i % len(images)]} for i in range(batch)]
    x1 = torch.randn(1, contract.channels, contract.input_size, contract.input_size)
    xb = x1.repeat(batch, 1, 1, 1)
    with torch.inference_mode():
        model_b1 = rate(lambda: scripted(x1), 1, seconds)
        model_bn = rate(lambda: scripted(xb), batch, seconds)
    pipeline = pipeline_rate(pred, images, batch, seconds)
    # The parts of the request path that are not the model, per image, timed apart: decoding the PNG
    # (mostly zlib inflate, about as fast in OpenCV, Pillow and torchvision) and OA-MEN's preprocessing
    # (`prepare` + `to_model_input`).
    grays = [decode_image(r["body"]) for r in rows]
    decode = rate(lambda: [decode_image(r["body"]) for r in rows], batch, 2.0)
    prep = rate(lambda: [to_model_input(prepare(g, contract), contract) for g in grays], batch, 2.0)
    image_ms = 1000 / pipeline
    finder: dict[str, float] = {}
    if pred.finder is not None:  # the knee-joint finder runs on every image, crops included
        net, cfg = pred.finder
        finder_ms = 1000 / rate(lambda: find_joints(net, cfg, grays), batch, 2.0)
        finder = {"finder_ms_per_image": finder_ms, f"finder_share_b{batch}": finder_ms / image_ms}
    return {
        **finder,
        "model_ips_b1": model_b1,
        f"model_ips_b{batch}": model_bn,
        f"pipeline_ips_b{batch}": pipeline,
        "decode_ms_per_image": 1000 / decode,
        "prep_ms_per_image": 1000 / prep,
        f"decode_share_b{batch}": (1000 / decode) / image_ms,
        f"prep_share_b{batch}": (1000 / prep) / image_ms,
    }


def jit_seconds(pid: int) -> float:
    """CPU seconds Java's JIT compiler threads ("C1 CompilerThre", "C2 CompilerThre") have used so far.

    Read from /proc (Linux); 0.0 where it cannot be read. The JIT compiles the frontend's hot paths in
    the first minutes of load, and gRPC's (Netty HTTP/2, protobuf, the gRPC executor) take longer than
    REST's (docs/BENCHMARKS.md, "Frontend warm-up").
    """
    total = 0.0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if "Compiler" in (task / "comm").read_text():
                    fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                    total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


@contextlib.contextmanager
def cpu_use(srv: ts.Server):
    """Cores used while the block runs by Java, the worker(s) and this process (the load generator).

    "workers" counts every child process Java has when the block starts: the model workers and, when it
    is running then, TorchServe's once-a-minute system-metrics collector. "java_jit" is the part of
    "java" spent by the JIT compiler (`jit_seconds`).

    Yields a dict that is filled in when the block ends:
    ``{"java": .., "java_jit": .., "workers": .., "load_generator": ..}``.
    """
    pid = ts.server_pid(srv.workdir)
    java = psutil.Process(pid)
    procs = {"java": [java], "workers": java.children(recursive=True), "load_generator": [psutil.Process()]}

    def seconds() -> dict[str, float]:
        out = {"java_jit": jit_seconds(pid)}
        for name, group in procs.items():
            total = 0.0
            for proc in group:
                with contextlib.suppress(psutil.Error):
                    t = proc.cpu_times()
                    total += t.user + t.system
            out[name] = total
        return out

    result: dict[str, float] = {}
    before, t0 = seconds(), time.perf_counter()
    yield result
    after, elapsed = seconds(), time.perf_counter() - t0
    result.update({name: (after[name] - before[name]) / elapsed for name in after})


JIT_SETTLED_MS = 0.1  # JIT compiler CPU per request (ms) below which the frontend counts as warmed up


def warm_up_jit(
    srv: ts.Server, images: list[bytes], concurrency: int, seconds: float = 15.0, max_passes: int = 12
) -> list[dict]:
    """Drive REST and gRPC in turn until Java's JIT has compiled both request paths.

    A pass is one ``seconds`` leg of each; the warm-up ends after the first pass in which the JIT
    spent under `JIT_SETTLED_MS` of CPU per request on both, or after ``max_passes``. Benchmarks that
    compare the protocols measure after this, as a long-running server runs; the passes (rate and JIT
    CPU per request of each leg) are returned so the report shows what the warm-up cost.
    """
    passes = []
    for k in range(max_passes):
        row: dict = {"pass": k + 1}
        for proto in ("rest", "grpc"):
            with cpu_use(srv) as cores:
                r = drive(srv, images, proto, concurrency, seconds)
            row[f"{proto}_rps"] = r["rps"]
            row[f"{proto}_jit_ms"] = 1000 * cores["java_jit"] / r["rps"] if r["rps"] else float("inf")
        passes.append(row)
        print(
            f"JIT warm-up pass {k + 1}: REST {row['rest_jit_ms']:.2f}, gRPC {row['grpc_jit_ms']:.2f} ms of compiler "
            "CPU per request",
            flush=True,
        )
        if jit_settled(row):
            break
    return passes


def jit_settled(row: dict) -> bool:
    """Whether a warm-up pass had the JIT under `JIT_SETTLED_MS` per request on both protocols."""
    return row["rest_jit_ms"] < JIT_SETTLED_MS and row["grpc_jit_ms"] < JIT_SETTLED_MS


@contextlib.contextmanager
def server(store: Path, batch: int, delay: int, log_config: Path = ts.LOG_CONFIG):
    with tempfile.TemporaryDirectory(prefix="koa-bench-") as tmp:
        srv = ts.start_on_free_ports(store, Path(tmp), batch_size=batch, max_batch_delay=delay, log_config=log_config)
        try:
            yield srv
        finally:
            ts.stop(Path(tmp))
