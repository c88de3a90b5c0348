"""Load generation for KOA-Serve, shared by Locust (loadtest/), the benchmarks (`ops.bench`), the fault
drills and the soak (`ops.drills`).

- Request images: `load_images` (one folder, for Locust) and `image_bodies` (the benchmarks' and drills'
  PNGs, with the test knee when the data set is absent).
- Answers: every one is checked against the answer schema of `koa_client.schema` (`validate_answer`).
- Drivers: `drive` (closed-loop clients for a measured window, `Tally`; REST through `HttpDriver`, gRPC
  through `GrpcAioDriver`, or the shipped clients) and `LoadDriver` (closed-loop client threads whose
  every request is kept as a `Record`, for the drills), and an open-loop Poisson load (`schedule`,
  `Sender`, `leg`: latency from each request's scheduled time, for the explanation benchmark).
  `attempt_label` / `count_attempts` name the attempts a retrying client sent again.
- The loopback guard: `check_loopback` refuses any target that is not this machine.

Importable without Locust (and so without gevent's monkey-patching).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import http.client
import ipaddress
import itertools
import json
import os
import random
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import grpc
import requests

from koa_client import KOAClientError
from koa_client.grpc_client import MAX_MESSAGE_BYTES, GrpcClient, load_stubs, parse_prediction
from koa_client.rest import RestClient, sniff_content_type

# The answer schema lives beside the client (koa_client/schema.py); re-exported for the load generators.
from koa_client.schema import InvalidAnswer, validate_answer

if TYPE_CHECKING:
    from ops.server import Server

__all__ = [
    "InvalidAnswer", "validate_answer", "check_loopback", "Image", "load_images", "image_bodies",
    "IMAGE_SUFFIXES", "DRIVERS", "Tally", "HttpDriver", "GrpcAioDriver", "drive", "idle_latency",
    "Record", "LoadDriver", "attempt_label", "count_attempts", "schedule", "Sender", "leg", "percentiles",
]  # fmt: skip

ROOT = Path(__file__).resolve().parents[1]
FALLBACK_IMAGE = ROOT / "tests" / "fixtures" / "knee_kl2.png"

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")
LOOPBACK_NAMES = ("localhost",)


def check_loopback(address: str) -> str:
    """Refuse any target that is not this machine: a load test must never hit someone else's server.

    Args:
        address: a URL (``http://127.0.0.1:8080``) or a gRPC ``host:port`` (``[::1]:7070``).

    Returns:
        The host name, when it is ``localhost``, an address in 127.0.0.0/8 or ``::1``.

    Raises:
        ValueError: any other host, or no host at all.
    """
    text = address.strip()
    host = urlsplit(text if "://" in text else f"//{text}").hostname
    if not host:
        raise ValueError(f"no host in {address!r}: give e.g. http://127.0.0.1:8080 or 127.0.0.1:7070")
    if host.lower() in LOOPBACK_NAMES:
        return host
    try:
        if ipaddress.ip_address(host).is_loopback:  # 127.0.0.0/8 and ::1
            return host
    except ValueError:
        pass
    raise ValueError(
        f"refusing to load-test {address!r}: only loopback targets are allowed "
        "(127.0.0.0/8, localhost or ::1); run the load test on the server's own machine"
    )


@dataclass(frozen=True)
class Image:
    """One request body: the file's bytes and its name (for messages)."""

    name: str
    data: bytes


def load_images(folder: str | Path) -> list[Image]:
    """Every PNG, JPEG and DICOM file directly in ``folder``, read once, sorted by name.

    Raises:
        RuntimeError: the folder does not exist or holds no such image.
    """
    root = Path(folder)
    if not root.is_dir():
        raise RuntimeError(f"image folder {root} does not exist: set KOA_IMAGES (or --images) to a folder of images")
    paths = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise RuntimeError(f"no {'/'.join(IMAGE_SUFFIXES)} files in {root}: set KOA_IMAGES (or --images)")
    return [Image(p.name, p.read_bytes()) for p in paths]


def image_bodies(folder: str | Path, limit: int) -> list[bytes]:
    """The bytes of the first ``limit`` PNGs under ``folder`` (recursively, sorted by path); the test knee
    (tests/fixtures/knee_kl2.png) when there are none, so the benchmarks and drills run without the data set."""
    root = Path(folder)
    files = sorted(root.rglob("*.png"))[:limit] if root.is_dir() else []
    return [f.read_bytes() for f in files or [FALLBACK_IMAGE]]


# REST through HttpDriver, gRPC through GrpcAioDriver (the benchmarks' drivers, equal client cost), and
# both shipped clients (koa_client.rest.RestClient, koa_client.grpc_client.GrpcClient).
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

    The shipped `koa_client.rest.RestClient` (requests) spends several times more CPU per request than this
    (`make bench` measures both; docs/BENCHMARKS.md). Where the load generator shares the server's cores,
    as on the 2-core machines here, that CPU comes out of the server's throughput; clients on other
    machines do not take it. So the benchmarks drive REST with this, and report the shipped client's
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

    The shipped `koa_client.grpc_client.GrpcClient` is synchronous: a thread per call in flight, each
    waiting on its own completion queue, which costs the load generator more CPU per request than this
    loop, while this one costs about what `HttpDriver` does for REST (docs/BENCHMARKS.md, "Where the CPU
    goes per request"). So both protocols are driven at about the same client cost, and the shipped gRPC
    client is measured beside them, as the shipped REST client is.
    """

    def __init__(self, target: str, token: str, model: str = "oamen", timeout: float = 120) -> None:
        self.target, self.model, self.timeout = target, model, timeout
        self.metadata = (("authorization", f"Bearer {token}"),)
        stubs = load_stubs()
        self.pb2, self.pb2_grpc = stubs.inference_pb2, stubs.inference_pb2_grpc

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


def _client(srv: Server, protocol: str, token: str):
    if protocol == "rest":
        return HttpDriver(srv.inference_url, token)
    if protocol == "rest-requests":
        return RestClient(srv.inference_url, token=token, timeout=120)
    if protocol == "grpc-sync":
        return GrpcClient(f"127.0.0.1:{srv.grpc_port}", token=token, timeout=120)
    raise ValueError(f"protocol must be one of {DRIVERS}, got {protocol!r}")


def drive(srv: Server, images: list[bytes], protocol: str, concurrency: int, seconds: float) -> dict:
    """``concurrency`` closed-loop clients for ``seconds`` (after a 3 s ramp): rate, failures, latency.

    ``protocol`` is one of `DRIVERS`. Every answer is checked against the answer schema
    (`validate_answer`); an error status or a malformed answer counts as a failure.

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


def idle_latency(srv: Server, images: list[bytes], n: int = 20) -> float:
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


@dataclass
class Record:
    """One request: times are ``time.monotonic()`` seconds; ``status`` 200 when ok.

    ``image`` is the index of the body sent, ``grade`` and ``probabilities`` the answer (when ok),
    ``retried`` the errors of the attempts the client sent again (only with ``retry_s`` > 0).
    """

    client: int
    kind: str
    start: float
    end: float
    ok: bool
    status: int
    error: str = ""
    protocol: str = "rest"
    image: int = -1
    grade: int | None = None
    probabilities: list[float] | None = None
    retried: list[str] = field(default_factory=list)


def attempt_label(exc: KOAClientError) -> str:
    """A short name for a failed attempt: ``refused``, ``reset`` (connected, then dropped) or status and kind."""
    text = exc.message.lower()
    if exc.kind == "connection_lost" or (exc.kind == "UNAVAILABLE" and any(w in text for w in ("reset", "closed"))):
        return "reset"
    if "refused" in text:
        return "refused"
    return f"{exc.status} {exc.kind or ''}".strip()


def count_attempts(client: RestClient | GrpcClient, errors: list[str]) -> None:
    """Append the `attempt_label` of every failed attempt of ``client`` (its retries included) to ``errors``."""
    once = "_predict_once" if isinstance(client, GrpcClient) else "_send_once"
    inner: Callable[..., Any] = getattr(client, once)

    def counted(*args: Any, **kwargs: Any) -> Any:
        try:
            return inner(*args, **kwargs)
        except KOAClientError as exc:
            errors.append(attempt_label(exc))
            raise

    setattr(client, once, counted)


class LoadDriver:
    """``clients`` closed-loop clients in threads (REST, the first ``grpc_clients`` gRPC); every request is recorded.

    Args:
        srv: the server.
        images: request bodies, used round-robin.
        clients: number of threads, each with one request outstanding at a time.
        explain_share: fraction of requests sent to ``/explanations`` (deterministic per client).
        timeout: client timeout per request, s.
        retry_s: the clients' ``retry_s`` (resend while unreachable / 503); when > 0 they also re-read
            the server's key file when their key is refused (a restarted server has new keys).
        grpc_clients: how many of the ``clients`` use gRPC.
    """

    def __init__(
        self,
        srv: Server,
        images: list[bytes],
        clients: int,
        explain_share: float = 0.0,
        timeout: float = 120.0,
        retry_s: float = 0.0,
        grpc_clients: int = 0,
    ) -> None:
        if clients < 1:
            raise ValueError(f"clients must be >= 1, got {clients}")
        if not 0 <= grpc_clients <= clients:
            raise ValueError(f"grpc_clients must be in [0, clients={clients}], got {grpc_clients}")
        if not 0.0 <= explain_share <= 1.0:
            raise ValueError(f"explain_share must be in [0, 1], got {explain_share}")
        self.srv, self.images, self.clients = srv, images, clients
        self.explain_share, self.timeout = explain_share, timeout
        self.retry_s, self.grpc_clients = retry_s, grpc_clients
        self._records: list[Record] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _client(self, k: int, token: str, retried: list[str]) -> tuple[str, Any]:
        """Client ``k`` and its protocol; every failed attempt's error is appended to ``retried``."""
        key_file = Path(self.srv.workdir) / "key_file.json" if self.retry_s > 0 else None
        opts = {"token": token, "timeout": self.timeout, "key_file": key_file, "retry_s": self.retry_s}
        if k < self.grpc_clients:
            protocol, client = "grpc", GrpcClient(f"127.0.0.1:{self.srv.grpc_port}", **opts)
        else:
            protocol, client = "rest", RestClient(self.srv.inference_url, **opts)
        count_attempts(client, retried)
        return protocol, client

    def _user(self, k: int, token: str) -> None:
        retried: list[str] = []
        protocol, client = self._client(k, token, retried)
        with client:
            i, credit = k, 0.0
            while not self._stop.is_set():
                credit += self.explain_share
                explain = credit >= 1.0
                credit -= 1.0 if explain else 0.0
                kind, image = "explain" if explain else "predict", i % len(self.images)
                retried.clear()
                t0 = time.monotonic()
                try:
                    answer = client.predict(self.images[image], explain=explain)
                    validate_answer(answer, explain=explain)
                    rec = Record(k, kind, t0, time.monotonic(), True, 200, "", protocol, image)
                    rec.grade, rec.probabilities = answer.get("kl_grade"), answer.get("probabilities")
                    rec.retried = list(retried)
                except KOAClientError as exc:
                    rec = Record(k, kind, t0, time.monotonic(), False, exc.status, str(exc)[:200], protocol, image)
                    rec.retried = list(retried[:-1])  # the last error is the one that was raised
                except InvalidAnswer as exc:  # answered 200, but not with a valid answer
                    error = f"invalid answer: {exc}"[:200]
                    rec = Record(k, kind, t0, time.monotonic(), False, 200, error, protocol, image)
                    rec.retried = list(retried)
                with self._lock:
                    self._records.append(rec)
                i += self.clients

    def start(self) -> LoadDriver:
        token = self.srv.keys()["inference"]
        for k in range(self.clients):
            t = threading.Thread(target=self._user, args=(k, token), name=f"load-{k}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> list[Record]:
        """Stop after each client's current request; return every record."""
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)
        return self.records()

    def records(self) -> list[Record]:
        with self._lock:
            return list(self._records)


# --- open loop -----------------------------------------------------------------------------------


def schedule(rate: float, seconds: float, share: float, seed: int) -> list[tuple[float, bool]]:
    """(send time in s, asks for an explanation) of an open-loop Poisson load; the same for every leg.

    Exactly ``round(share * n)`` of the ``n`` requests, at random places, ask for an explanation: with a
    coin per request a short leg can get a handful too few, and explanations are what is measured here.
    """
    rng = random.Random(seed)
    times, t = [], rng.expovariate(rate)
    while t < seconds:
        times.append(t)
        t += rng.expovariate(rate)
    explain = set(rng.sample(range(len(times)), round(share * len(times))))
    return [(at, k in explain) for k, at in enumerate(times)]


class Sender:
    """Open-loop REST calls (`schedule`, `leg`) to one server, one ``requests`` session (keep-alive
    connection) per thread."""

    def __init__(self, srv: Server, image: bytes, method: str) -> None:
        self.base = srv.inference_url
        self.auth = {"Authorization": f"Bearer {srv.keys()['inference']}"}
        self.image, self.method = image, method
        self.local = threading.local()

    def call(self, explain: bool) -> tuple[bool, str]:
        """One request; (answer valid, why not)."""
        session = getattr(self.local, "session", None)
        if session is None:
            session = self.local.session = requests.Session()
            session.headers.update(self.auth)
        try:
            if explain:  # as koa_client.rest.RestClient sends it
                files = {"data": ("knee.png", self.image, "image/png")}
                url = f"{self.base}/explanations/oamen"
                resp = session.post(url, files=files, data={"method": self.method}, timeout=300)
            else:
                headers = {"Content-Type": "image/png"}
                resp = session.post(f"{self.base}/predictions/oamen", data=self.image, headers=headers, timeout=300)
            if resp.status_code != 200:
                return False, f"{resp.status_code}: {resp.text[:120]}"
            validate_answer(resp.json(), explain=explain)
            return True, ""
        except (requests.RequestException, ValueError, InvalidAnswer) as exc:
            return False, f"{type(exc).__name__}: {exc}"[:160]


def percentiles(ms: list[float]) -> dict[str, float | None]:
    if len(ms) < 2:
        return {"n": len(ms), "p50_ms": None, "p95_ms": None, "p99_ms": None, "mean_ms": None}
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return {"n": len(ms), "p50_ms": q[49], "p95_ms": q[94], "p99_ms": q[98], "mean_ms": statistics.fmean(ms)}


def leg(sender: Sender, plan: list[tuple[float, bool]], ramp_s: float) -> dict[str, Any]:
    """Send ``plan`` open-loop; latency from each request's scheduled time to its answer (requests
    scheduled in the first ``ramp_s`` seconds are not counted)."""
    records: list[tuple[float, bool, bool, float, str]] = []
    lock = threading.Lock()
    t0 = time.perf_counter() + 0.2

    def one(at: float, explain: bool) -> None:
        ok, why = sender.call(explain)
        with lock:
            records.append((at, explain, ok, (time.perf_counter() - t0 - at) * 1000, why))

    load = os.getloadavg()[0]
    with cf.ThreadPoolExecutor(64) as pool:
        for at, explain in plan:
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(one, at, explain)
    counted = [r for r in records if r[0] >= ramp_s]
    errors = sorted({r[4] for r in counted if not r[2]})
    out: dict[str, Any] = {"loadavg_1min_at_start": round(load, 2), "failures": sum(not r[2] for r in counted)}
    out["errors"] = errors[:5]
    out["plain"] = percentiles([r[3] for r in counted if r[2] and not r[1]])
    out["explain"] = percentiles([r[3] for r in counted if r[2] and r[1]])
    return out
