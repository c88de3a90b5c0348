"""Served against in-process throughput and idle latency, measured side by side in one run.

``python scripts/bench_serve.py [--batch 8] [--delay 50] [--concurrency 16] [--seconds 30]``

1. In-process, no server: the handler's whole request path (`handler.service.Predictor`: decode,
   preprocess, batch, TorchScript model) on batches of ``--batch`` raw PNGs, and the
   TorchScript model alone at batch 1 and ``--batch``.
2. TorchServe with the same batch size, ``--concurrency`` REST clients in threads for
   ``--seconds`` (`HttpDriver`, every answer validated): requests/s, failures, latency percentiles.
3. Idle latency: one request at a time, against model time + max batch delay + 20 ms.

Prints a Markdown table and the ratios; ``--json`` also writes them. A benchmark, not a test:
these machines are shared and noisy, so compare ratios from one run, not absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import contextlib
import http.client
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import tsctl  # noqa: E402

from client import KOAClientError  # noqa: E402
from client.grpc_client import MAX_MESSAGE_BYTES, GrpcClient, load_stubs, parse_prediction  # noqa: E402
from client.rest import RestClient, sniff_content_type  # noqa: E402
from handler.memory import keep_freed_memory  # noqa: E402
from handler.service import Predictor  # noqa: E402
from loadtest import InvalidAnswer, validate_answer  # noqa: E402
from model import create_model  # noqa: E402
from model.checkpoint import load_torchscript  # noqa: E402
from model.decode import decode_image  # noqa: E402
from model.preprocess import prepare, to_model_input  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--delay", type=int, default=50, help="max batch delay, ms")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "data" / "koa" / "val")
    p.add_argument("--max-images", type=int, default=64)
    p.add_argument("--model", type=Path, default=ROOT / "build" / "oamen.pt")
    p.add_argument("--store", type=Path, default=ROOT / "model_store")
    p.add_argument("--json", type=Path, default=None)
    return p


def load_images(folder: Path, limit: int) -> list[bytes]:
    files = sorted(folder.rglob("*.png"))[:limit] if folder.is_dir() else []
    if not files:
        files = [ROOT / "tests" / "fixtures" / "knee_kl2.png"]
    return [f.read_bytes() for f in files]


def rate(fn, items_per_call: int, seconds: float) -> float:
    """Items per second of ``fn()``, after one warm-up call, over at least ``seconds``."""
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n * items_per_call / (time.perf_counter() - t0)


def load_predictor(model_path: Path) -> Predictor:
    """The handler's request path (`handler.service.Predictor`) on CPU, from the exported model, with the
    worker's malloc settings (`handler.memory`), so in-process and served run the same way."""
    keep_freed_memory()
    scripted, contract = load_torchscript(model_path)
    eager = create_model(contract.model_name, num_classes=contract.num_classes, in_chans=contract.channels)
    eager.load_state_dict(scripted.state_dict())
    return Predictor(scripted, eager.eval(), contract, torch.device("cpu"))


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
    # (mostly zlib inflate: OpenCV, Pillow and torchvision took 0.55-0.64 ms for these 224 px PNGs when
    # compared once here) and OA-MEN's preprocessing (`prepare` + `to_model_input`).
    grays = [decode_image(r["body"]) for r in rows]
    decode = rate(lambda: [decode_image(r["body"]) for r in rows], batch, 2.0)
    prep = rate(lambda: [to_model_input(prepare(g, contract), contract) for g in grays], batch, 2.0)
    image_ms = 1000 / pipeline
    return {
        "model_ips_b1": model_b1,
        f"model_ips_b{batch}": model_bn,
        f"pipeline_ips_b{batch}": pipeline,
        "decode_ms_per_image": 1000 / decode,
        "prep_ms_per_image": 1000 / prep,
        f"decode_share_b{batch}": (1000 / decode) / image_ms,
        f"prep_share_b{batch}": (1000 / prep) / image_ms,
    }


# REST through HttpDriver, gRPC through GrpcAioDriver (the benchmarks' drivers, equal client cost), and
# both shipped clients (client.rest.RestClient, client.grpc_client.GrpcClient).
DRIVERS = ("rest", "grpc", "rest-requests", "grpc-sync")
RAMP_S = 3.0  # seconds of load before the counted window


class Tally:
    """Latencies and failures of a load run; only those between `open` and `close` count."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.failures = 0
        self.t0 = self.elapsed = 0.0
        self.counting = False

    def ok(self, t0: float) -> None:
        ms = (time.perf_counter() - t0) * 1000
        with self.lock:
            if self.counting:
                self.latencies.append(ms)

    def failed(self) -> None:
        with self.lock:
            if self.counting:
                self.failures += 1

    def open(self) -> None:
        with self.lock:
            self.counting, self.t0 = True, time.perf_counter()

    def close(self) -> None:
        with self.lock:
            self.counting, self.elapsed = False, time.perf_counter() - self.t0

    def result(self) -> dict:
        lat = self.latencies
        q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [float("nan")] * 99
        rps = len(lat) / self.elapsed if self.elapsed else 0.0
        return {"rps": rps, "failures": self.failures, "p50_ms": q[49], "p95_ms": q[94], "p99_ms": q[98]}


class HttpDriver:
    """REST load without the weight of a full client: one keep-alive ``http.client`` connection.

    The shipped `client.rest.RestClient` (requests) spends about 0.9 ms of CPU per request, this about
    0.2 ms (`make bench` measures both). Where the load generator shares the server's cores, as on the
    2-core machines here, those milliseconds come out of the server's throughput; clients on other
    machines do not take them. So the benchmarks drive REST with this, and report the shipped client's
    cost beside it. Answers are parsed here and validated by `drive`, as for the other clients.
    """

    def __init__(self, url: str, token: str, model: str = "oamen", timeout: float = 120) -> None:
        parts = urlsplit(url)
        self.path = f"/predictions/{model}"
        self.auth = f"Bearer {token}"
        self.conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)

    def close(self) -> None:
        self.conn.close()

    def predict(self, image: bytes) -> dict:
        try:
            headers = {"Authorization": self.auth, "Content-Type": sniff_content_type(image[:132])}
            self.conn.request("POST", self.path, body=image, headers=headers)
            resp = self.conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            self.conn.close()  # http.client reconnects on the next request
            raise KOAClientError(503, f"{type(exc).__name__}: {exc}", "connection") from None
        if resp.status != 200:
            raise KOAClientError(resp.status, body[:200].decode("utf-8", "replace"))
        try:
            return json.loads(body)
        except ValueError:
            raise KOAClientError(502, f"answer is not JSON: {body[:200]!r}", "bad_answer") from None


class GrpcAioDriver:
    """gRPC load from one asyncio loop (``grpc.aio``): every call in flight on one channel.

    The shipped `client.grpc_client.GrpcClient` is synchronous: a thread per call in flight, each
    waiting on its own completion queue. Measured here on a warmed server (4 rounds, 32 calls in
    flight), that spent 0.34-0.38 ms of load-generator CPU per request, this 0.23-0.25 ms, the same as
    `HttpDriver` for REST (0.23); in three `make bench` runs since, this 0.24-0.31 ms against
    0.21-0.25. So both protocols are driven at about the same client cost, and the shipped gRPC
    client is measured beside them, as the shipped REST client is.
    """

    def __init__(self, target: str, token: str, model: str = "oamen", timeout: float = 120) -> None:
        self.target, self.model, self.timeout = target, model, timeout
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.pb2, self.pb2_grpc, _ = load_stubs()

    async def run(self, images: list[bytes], concurrency: int, tally: Tally, ramp: float, seconds: float) -> None:
        """``concurrency`` closed-loop calls for ``ramp`` + ``seconds``; ``tally`` counts the last ``seconds``."""
        reqs = [self.pb2.PredictionsRequest(model_name=self.model, input={"data": im}) for im in images]
        stop = asyncio.Event()
        options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        async with grpc.aio.insecure_channel(self.target, options=options) as channel:
            stub = self.pb2_grpc.InferenceAPIsServiceStub(channel)

            async def user(k: int) -> None:
                for i in itertools.count(k, concurrency):
                    if stop.is_set():
                        return
                    t0 = time.perf_counter()
                    try:
                        resp = await stub.Predictions(reqs[i % len(reqs)], timeout=self.timeout, metadata=self.metadata)
                        validate_answer(parse_prediction(resp.prediction))
                        tally.ok(t0)
                    except (grpc.RpcError, KOAClientError, InvalidAnswer):
                        tally.failed()

            users = [asyncio.create_task(user(k)) for k in range(concurrency)]
            await asyncio.sleep(ramp)
            tally.open()
            await asyncio.sleep(seconds)
            tally.close()
            stop.set()
            await asyncio.gather(*users)


def _client(srv: tsctl.Server, protocol: str, token: str):
    if protocol == "rest":
        return HttpDriver(srv.inference_url, token)
    if protocol == "rest-requests":
        return RestClient(srv.inference_url, token=token, timeout=120)
    if protocol == "grpc-sync":
        return GrpcClient(f"127.0.0.1:{srv.grpc_port}", token=token, timeout=120)
    raise ValueError(f"protocol must be one of {DRIVERS}, got {protocol!r}")


def drive(srv: tsctl.Server, images: list[bytes], protocol: str, concurrency: int, seconds: float) -> dict:
    """``concurrency`` closed-loop clients for ``seconds`` (after a 3 s ramp): rate, failures, latency.

    ``protocol`` is one of `DRIVERS`. Every answer is checked against the answer schema
    (`loadtest.validate_answer`); an error status or a malformed answer counts as a failure.

    "grpc" runs `GrpcAioDriver`; the others run a thread per client. The shipped gRPC client's
    threads share one client, so one channel, as gRPC advises (a channel multiplexes concurrent
    calls); each REST client has its own connection: HTTP/1.1 carries one request at a time.
    """
    if protocol not in DRIVERS:
        raise ValueError(f"protocol must be one of {DRIVERS}, got {protocol!r}")
    tally = Tally()
    token = srv.keys()["inference"]
    if protocol == "grpc":
        driver = GrpcAioDriver(f"127.0.0.1:{srv.grpc_port}", token)
        asyncio.run(driver.run(images, concurrency, tally, RAMP_S, seconds))
        return tally.result()
    shared = _client(srv, protocol, token) if protocol == "grpc-sync" else None
    stop = threading.Event()

    def user(k: int) -> None:
        client = shared or _client(srv, protocol, token)
        try:
            for i in itertools.count(k, concurrency):
                if stop.is_set():
                    return
                t0 = time.perf_counter()
                try:
                    validate_answer(client.predict(images[i % len(images)]))
                    tally.ok(t0)
                except (KOAClientError, InvalidAnswer):
                    tally.failed()
        finally:
            if client is not shared:
                client.close()

    try:
        with cf.ThreadPoolExecutor(concurrency) as pool:
            futures = [pool.submit(user, k) for k in range(concurrency)]
            time.sleep(RAMP_S)
            tally.open()
            time.sleep(seconds)
            tally.close()
            stop.set()
            for f in futures:
                f.result()
    finally:
        if shared is not None:
            shared.close()
    return tally.result()


def idle_latency(srv: tsctl.Server, images: list[bytes], n: int = 20) -> float:
    """Median latency of one request at a time through the shipped REST client, after a warm-up."""
    client = _client(srv, "rest-requests", srv.keys()["inference"])
    for img in images[:4]:
        client.predict(img)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        client.predict(images[i % len(images)])
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def jit_seconds(pid: int) -> float:
    """CPU seconds Java's JIT compiler threads ("C1 CompilerThre", "C2 CompilerThre") have used so far.

    Read from /proc (Linux); 0.0 where it cannot be read. The JIT compiles the frontend's hot paths in
    the first minutes of load, and gRPC's (Netty HTTP/2, protobuf, the gRPC executor) take longer than
    REST's: on this machine 1.0-1.5 ms of compiler CPU per gRPC request in the first minute of load,
    against 0.8-1.0 ms for REST; REST's under 0.1 ms after 2.5-3 minutes, gRPC's after about 5
    (docs/BENCHMARKS.md).
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
def cpu_use(srv: tsctl.Server):
    """Cores used while the block runs by Java, the worker(s) and this process (the load generator).

    "workers" counts every child process Java has when the block starts: the model workers and, when it
    is running then, TorchServe's once-a-minute system-metrics collector. "java_jit" is the part of
    "java" spent by the JIT compiler (`jit_seconds`).

    Yields a dict that is filled in when the block ends:
    ``{"java": .., "java_jit": .., "workers": .., "load_generator": ..}``.
    """
    import psutil

    pid = tsctl._pid(srv.workdir)
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
    srv: tsctl.Server, images: list[bytes], concurrency: int, seconds: float = 15.0, max_passes: int = 12
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
def server(store: Path, batch: int, delay: int, log_config: Path = tsctl.LOG_CONFIG):
    with tempfile.TemporaryDirectory(prefix="koa-bench-") as tmp:
        srv = tsctl.start_on_free_ports(
            store, Path(tmp), batch_size=batch, max_batch_delay=delay, log_config=log_config
        )
        try:
            yield srv
        finally:
            tsctl.stop(Path(tmp))


def main(args: argparse.Namespace) -> dict:
    images = load_images(args.images, args.max_images)
    b = args.batch
    ip = in_process(args.model, images, b, min(10.0, args.seconds / 3))
    with server(args.store, b, args.delay) as srv:
        idle = idle_latency(srv, images)
        rest = drive(srv, images, "rest", args.concurrency, args.seconds)
    model_ms_b1 = 1000 / ip["model_ips_b1"]
    result = {
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "batch": b,
        "max_batch_delay_ms": args.delay,
        "concurrency": args.concurrency,
        "images": len(images),
        **ip,
        **{f"served_{k}": v for k, v in rest.items()},
        "idle_p50_ms": idle,
        "served_over_pipeline": rest["rps"] / ip[f"pipeline_ips_b{b}"],
        "served_over_model": rest["rps"] / ip[f"model_ips_b{b}"],
        "idle_budget_ms": model_ms_b1 + args.delay + 20,
    }
    print(
        f"batch {b}, max delay {args.delay} ms, {args.concurrency} REST clients, "
        f"{args.seconds:.0f} s, {len(images)} images"
    )
    print("| measure | value |\n|---|---|")
    for k, v in result.items():
        print(f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |")
    print(
        f"\nserved / in-process pipeline = {result['served_over_pipeline']:.2f} (target >= 0.90); "
        f"idle p50 {idle:.0f} ms vs model {model_ms_b1:.0f} ms + delay {args.delay} ms + 20 ms "
        f"= {result['idle_budget_ms']:.0f} ms"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
