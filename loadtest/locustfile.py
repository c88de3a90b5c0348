"""Locust users for KOA-Serve: REST (``RestUser``) and gRPC (``GrpcUser``), both token-aware.

    .venv/bin/locust -f loadtest/locustfile.py --headless -u 4 -r 2 -t 30s --host http://127.0.0.1:8080

Run it from the repository root: Locust puts its working directory on the import path, and this file
imports the project's packages from there. `loadtest.run` (``make loadtest``) drives this file and
writes the reports; run Locust on it directly for the web UI. Every answer is validated (status 200
and the answer schema, see `ops.load.validate_answer`); one that fails is reported as a Locust failure with the reason.

Environment:
    KOA_TOKEN / KOA_KEY_FILE: the inference key, or the server's key_file.json
        (default: ``logs/serve/key_file.json`` of ``make serve``).
    KOA_IMAGES: folder of *.png / *.jpg / *.dcm request images (default: ``tests/fixtures``).
    KOA_EXPLAIN_SHARE: share of requests that also ask for an explanation (default 0.0).
    KOA_GRPC_TARGET: gRPC inference ``host:port`` (default ``127.0.0.1:7070``).
    KOA_USERS: ``rest``, ``grpc`` or ``rest,grpc`` (default: Locust's own class selection).
    KOA_MODEL, KOA_TIMEOUT: model name (``oamen``) and seconds per request (120).
    KOA_USER_RATE: requests/s per user for an open-loop load (default 0: closed loop).
    KOA_LATENCY_FILE: write every request's time (ms, one per line) there at exit; Locust's own
        percentiles are rounded to two significant digits (run.py reads this file instead).
The REST address is Locust's ``--host``. Only loopback targets are accepted.
"""

from __future__ import annotations

# Locust first: it monkey-patches the standard library with gevent, which must happen before
# requests (or urllib3) is imported, or calls end in RecursionError (see shared/TORCHSERVE.md).
from locust import HttpUser, User, constant, constant_throughput, events, task  # isort: skip
from locust import stats as locust_stats  # isort: skip

import grpc.experimental.gevent  # isort: skip

grpc.experimental.gevent.init_gevent()  # gRPC's C core must yield to gevent, before any channel

import logging  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import grpc  # noqa: E402

from koa_client import KOAClientError, error_from_answer, load_token  # noqa: E402
from koa_client.grpc_client import GrpcClient, parse_prediction, rpc_error  # noqa: E402
from koa_client.rest import sniff_content_type  # noqa: E402
from ops.load import Image, InvalidAnswer, check_loopback, load_images, validate_answer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger(__name__)

USER_CLASSES = {"rest": "RestUser", "grpc": "GrpcUser"}
MODEL = os.environ.get("KOA_MODEL", "oamen")
TIMEOUT = float(os.environ.get("KOA_TIMEOUT", "120"))
GRPC_TARGET = os.environ.get("KOA_GRPC_TARGET", "127.0.0.1:7070")
DEFAULT_KEY_FILE = ROOT / "logs" / "serve" / "key_file.json"
# Behind the secure front door (make serve TLS=1): https:// host, grpcs:// target, the door's CA and this
# load generator's client certificate; the certificate is the credential, so no token is read.
CA_FILE = os.environ.get("KOA_CA_FILE") or None
CERT_FILE = os.environ.get("KOA_CERT_FILE") or None
CERT_KEY_FILE = os.environ.get("KOA_CERT_KEY_FILE") or None
# KOA_USER_RATE > 0: open loop, each user paced at that many requests/s (to load at a chosen
# fraction of saturation); 0: closed loop, each user sends as soon as it has an answer.
USER_RATE = float(os.environ.get("KOA_USER_RATE", "0") or 0)
WAIT = constant_throughput(USER_RATE) if USER_RATE > 0 else constant(0)
LATENCY_FILE = os.environ.get("KOA_LATENCY_FILE", "")


def explain_share() -> float:
    """``KOA_EXPLAIN_SHARE`` as a number in [0, 1].

    Raises:
        ValueError: not a number, or outside [0, 1].
    """
    raw = os.environ.get("KOA_EXPLAIN_SHARE", "0") or "0"
    try:
        share = float(raw)
    except ValueError:
        raise ValueError(f"KOA_EXPLAIN_SHARE must be a number in [0, 1], got {raw!r}") from None
    if not 0 <= share <= 1:
        raise ValueError(f"KOA_EXPLAIN_SHARE must be in [0, 1], got {share}")
    return share


def selected_users() -> set[str] | None:
    """The protocols named by ``KOA_USERS`` (None: let Locust choose the classes).

    Raises:
        ValueError: an unknown name.
    """
    raw = os.environ.get("KOA_USERS", "").strip()
    if not raw:
        return None
    names = {n.strip().lower() for n in raw.split(",") if n.strip()}
    unknown = names - set(USER_CLASSES)
    if unknown or not names:
        raise ValueError(f"KOA_USERS={raw!r}: give a comma-separated subset of {sorted(USER_CLASSES)}")
    return names


class RequestFailed(Exception):
    """A failed gRPC request as Locust reports it: the reason (and the image, for an invalid answer)."""


class _Setup:
    """What every user shares, resolved once per process at Locust's init."""

    token: str = ""
    images: list[Image] = []
    explain_share: float = 0.0
    latencies_ms: list[float] = []  # every request's time, failures included, as Locust counts them


def _pick() -> tuple[Image, bool]:
    return random.choice(_Setup.images), random.random() < _Setup.explain_share


class RestUser(HttpUser):
    """POST each image as the raw body to ``/predictions/<model>`` (or ``/explanations/<model>``)."""

    host = "http://127.0.0.1:8080"  # --host overrides it
    wait_time = WAIT

    def on_start(self) -> None:
        if CA_FILE or CERT_FILE:
            self.client.trust_env = False  # REQUESTS_CA_BUNDLE would otherwise replace the CA given here
            self.client.verify = CA_FILE or True
            self.client.cert = (CERT_FILE, CERT_KEY_FILE) if CERT_KEY_FILE else CERT_FILE
        if _Setup.token:
            self.client.headers["Authorization"] = f"Bearer {_Setup.token}"

    @task
    def predict(self) -> None:
        image, explain = _pick()
        kind = "explain" if explain else "predict"
        path = f"/{'explanations' if explain else 'predictions'}/{MODEL}"
        headers = {"Content-Type": sniff_content_type(image.data[:132])}
        with self.client.post(
            path, data=image.data, headers=headers, name=f"rest {kind}", timeout=TIMEOUT, catch_response=True
        ) as resp:
            if resp.status_code != 200:
                # The server's message, without the image name: Locust groups failures by message.
                if not resp.status_code:
                    resp.failure(f"no answer ({resp.error})")
                else:
                    resp.failure(str(error_from_answer(resp.status_code, resp.content or b"")))
                return
            try:
                validate_answer(resp.json(), explain=explain)
            except ValueError as exc:  # InvalidAnswer, or a body that is not JSON
                resp.failure(f"{image.name}: invalid answer: {exc}")
            else:
                resp.success()


class GrpcUser(User):
    """``InferenceAPIsService/Predictions`` with the image under ``data`` (``explain=true`` when asked)."""

    wait_time = WAIT

    def on_start(self) -> None:
        tls = {"ca_file": CA_FILE, "cert_file": CERT_FILE, "cert_key_file": CERT_KEY_FILE}
        self.grpc = GrpcClient(GRPC_TARGET, token=_Setup.token or None, model=MODEL, timeout=TIMEOUT, **tls)

    def on_stop(self) -> None:
        self.grpc.close()

    @task
    def predict(self) -> None:
        image, explain = _pick()
        request = self.grpc.request(image.data, explain=explain)
        error: RequestFailed | None = None
        length = 0
        start = time.perf_counter()
        try:
            reply = self.grpc.stub.Predictions(request, timeout=TIMEOUT, metadata=self.grpc.metadata)
        except grpc.RpcError as exc:
            elapsed = time.perf_counter() - start
            error = RequestFailed(str(rpc_error(exc)))
        else:
            elapsed = time.perf_counter() - start  # the call only: parsing and checks are not timed
            length = len(reply.prediction)
            try:
                validate_answer(parse_prediction(reply.prediction), explain=explain)
            except KOAClientError as exc:  # the handler's error body, sent with status OK
                error = RequestFailed(str(exc))
            except InvalidAnswer as exc:
                error = RequestFailed(f"{image.name}: invalid answer: {exc}")
        events.request.fire(
            request_type="grpc",
            name=f"grpc {'explain' if explain else 'predict'}",
            response_time=elapsed * 1000,
            response_length=length,
            exception=error,
            context={"image": image.name},
        )


def _select_classes() -> None:
    """Mark the classes ``KOA_USERS`` leaves out as abstract, so Locust does not run them."""
    try:
        chosen = selected_users()
    except ValueError as exc:
        raise SystemExit(f"loadtest: {exc}") from None
    if chosen is None:
        return
    for name, cls in (("rest", RestUser), ("grpc", GrpcUser)):
        cls.abstract = name not in chosen


_select_classes()


@events.init.add_listener
def _setup(environment: Any, **_: Any) -> None:
    """Refuse non-loopback targets, then read the token and the images once, before any user starts."""
    try:
        if environment.host:
            check_loopback(environment.host)
        check_loopback(GRPC_TARGET)
        key_file = os.environ.get("KOA_KEY_FILE") or DEFAULT_KEY_FILE
        door = CERT_FILE is not None and not os.environ.get("KOA_TOKEN")
        _Setup.token = "" if door else load_token(key_file=key_file)
        _Setup.images = load_images(os.environ.get("KOA_IMAGES") or ROOT / "tests" / "fixtures")
        _Setup.explain_share = explain_share()
    except (ValueError, RuntimeError) as exc:
        # SystemExit passes through Locust's event hook (an Exception would only be logged).
        raise SystemExit(f"loadtest: {exc}") from None
    log.info("%d images, explain share %.2f, gRPC %s", len(_Setup.images), _Setup.explain_share, GRPC_TARGET)


@events.quitting.add_listener
def _final_csv(environment: Any, **_: Any) -> None:
    """Let Locust's CSV writer make one more pass before its files are closed.

    It rewrites the files every ``CSV_STATS_INTERVAL_SEC`` but not at exit, so without this the CSV
    (and run.py's summary) miss the requests that ended in the last second or while users stopped.
    """
    if getattr(environment.parsed_options, "csv_prefix", None):
        gevent.sleep(locust_stats.CSV_STATS_INTERVAL_SEC + 0.2)


@events.request.add_listener
def _record_latency(response_time: float, **_: Any) -> None:
    if LATENCY_FILE:
        _Setup.latencies_ms.append(response_time)


@events.quitting.add_listener
def _write_latencies(environment: Any, **_: Any) -> None:
    """Every request's time, unrounded, for exact percentiles (KOA_LATENCY_FILE)."""
    if LATENCY_FILE:
        Path(LATENCY_FILE).write_text("".join(f"{t:.3f}\n" for t in _Setup.latencies_ms))
