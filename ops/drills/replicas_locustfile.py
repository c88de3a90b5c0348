"""Locust users of the replica drill (`ops.drills.replicas`): the shipped clients, with their retry.

Unlike loadtest/locustfile.py, which measures the server, these users are callers built the way
docs/API.md tells an integrator to build them: `koa_client.RestClient` / `koa_client.GrpcClient` with
``retry_s`` (a request is sent again while the balancer cannot be reached or answers 503). Locust
sees one request per caller's request, after the retries: a Locust failure is a *lost* request.
Every answer is validated against the answer schema and against the reference answer of its image
(grade equal, probabilities within ``PROB_TOL``); a different answer is a failure too.

Environment (set by the drill):
    KOA_DRILL_GRPC_TARGET  gRPC ``host:port`` of the balancer.
    KOA_KEY_FILE           the cluster's key_file.json (the balancer's token).
    KOA_IMAGES             folder of request images.
    KOA_DRILL_REFERENCE    JSON {image name: {"kl_grade", "probabilities"}} to compare with ('' : none).
    KOA_DRILL_RECORDS      where to write every request's record (JSON lines) at exit.
    KOA_RETRY_S, KOA_TIMEOUT  the clients' retry window and per-attempt timeout, seconds.
    KOA_USERS              ``rest``, ``grpc`` or ``rest,grpc`` (default both, Locust shares users out evenly).
"""

from __future__ import annotations

from locust import User, constant, events, task  # isort: skip

import grpc.experimental.gevent  # isort: skip

grpc.experimental.gevent.init_gevent()

import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

# Locust puts its working directory on the import path: the drill runs it from the repository root.
from koa_client import KOAClientError, load_token  # noqa: E402
from koa_client.grpc_client import GrpcClient  # noqa: E402
from koa_client.rest import RestClient  # noqa: E402
from ops.load import InvalidAnswer, check_loopback, count_attempts, load_images, validate_answer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

PROB_TOL = 1e-4
RETRY_S = float(os.environ.get("KOA_RETRY_S", "60"))
TIMEOUT = float(os.environ.get("KOA_TIMEOUT", "120"))
GRPC_TARGET = os.environ.get("KOA_DRILL_GRPC_TARGET", "127.0.0.1:7170")
RECORDS = os.environ.get("KOA_DRILL_RECORDS", "")


class Setup:
    token = ""
    images: list[Any] = []
    reference: dict[str, dict[str, Any]] = {}
    records: list[dict[str, Any]] = []


def check_answer(name: str, answer: dict[str, Any]) -> None:
    """Raise InvalidAnswer unless ``answer`` is a valid grade equal to the reference answer of ``name``."""
    validate_answer(answer)
    ref = Setup.reference.get(name)
    if ref is None:
        return
    if answer["kl_grade"] != ref["kl_grade"]:
        raise InvalidAnswer(f"grade {answer['kl_grade']}, the reference says {ref['kl_grade']}")
    diff = max(abs(a - b) for a, b in zip(answer["probabilities"], ref["probabilities"]))
    if diff > PROB_TOL:
        raise InvalidAnswer(f"probabilities differ from the reference by {diff:.2g}")


class _DrillUser(User):
    abstract = True
    wait_time = constant(0)
    protocol = ""

    def make_client(self) -> Any:
        raise NotImplementedError

    def on_start(self) -> None:
        self.client = self.make_client()
        self.attempt_errors: list[str] = []
        count_attempts(self.client, self.attempt_errors)

    def on_stop(self) -> None:
        self.client.close()

    @task
    def grade(self) -> None:
        image = random.choice(Setup.images)
        self.attempt_errors.clear()
        start = time.time()
        error: Exception | None = None
        try:
            answer = self.client.predict(image.data)
            check_answer(image.name, answer)
        except KOAClientError as exc:  # given up: the retry window passed, or an error that is not resent
            error = exc
        except InvalidAnswer as exc:
            error = InvalidAnswer(f"{image.name}: wrong answer: {exc}")
        end = time.time()
        retried = list(self.attempt_errors[:-1] if isinstance(error, KOAClientError) else self.attempt_errors)
        Setup.records.append(
            {
                "protocol": self.protocol,
                "image": image.name,
                "start": start,
                "end": end,
                "ok": error is None,
                "error": str(error)[:300] if error else "",
                "wrong": isinstance(error, InvalidAnswer),
                "retried": retried,
            }
        )
        events.request.fire(
            request_type=self.protocol,
            name=f"{self.protocol} predict",
            response_time=(end - start) * 1000,
            response_length=0,
            exception=error,
            context={},
        )


class RestUser(_DrillUser):
    protocol = "rest"
    host = "http://127.0.0.1:8180"

    def make_client(self) -> RestClient:
        return RestClient(self.host, token=Setup.token, timeout=TIMEOUT, retry_s=RETRY_S)


class GrpcUser(_DrillUser):
    protocol = "grpc"

    def make_client(self) -> GrpcClient:
        return GrpcClient(GRPC_TARGET, token=Setup.token, timeout=TIMEOUT, retry_s=RETRY_S)


def _select() -> None:
    chosen = {p.strip() for p in os.environ.get("KOA_USERS", "rest,grpc").split(",") if p.strip()}
    RestUser.abstract = "rest" not in chosen
    GrpcUser.abstract = "grpc" not in chosen


_select()


@events.init.add_listener
def _setup(environment: Any, **_: Any) -> None:
    try:
        if environment.host:
            check_loopback(environment.host)
            RestUser.host = environment.host
        check_loopback(GRPC_TARGET)
        Setup.token = load_token(key_file=os.environ["KOA_KEY_FILE"])
        Setup.images = load_images(os.environ.get("KOA_IMAGES") or ROOT / "tests" / "fixtures")
        ref = os.environ.get("KOA_DRILL_REFERENCE", "")
        Setup.reference = json.loads(Path(ref).read_text()) if ref else {}
    except (KeyError, ValueError, RuntimeError, OSError) as exc:
        raise SystemExit(f"drill: {exc}") from None


@events.quitting.add_listener
def _write_records(environment: Any, **_: Any) -> None:
    if RECORDS:
        Path(RECORDS).write_text("".join(json.dumps(r) + "\n" for r in Setup.records))
