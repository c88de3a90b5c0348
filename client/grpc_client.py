"""gRPC client of KOA-Serve: TorchServe's ``InferenceAPIsService`` (Ping, Predictions).

The stubs come from ``python -m client.gen_proto`` (TorchServe's own proto, generated into
``client/_proto``). The request's ``input`` map carries the same fields as a REST form:
``data`` (image bytes) and, when asked, ``explain``, ``target`` and ``method``; gRPC has no explain
call, so ``explain=b"true"`` asks for one.

TorchServe answers a handler's per-request error with gRPC status OK and the error body
(``{"error": {...}}``) as the prediction; this client raises `KOAClientError` for it, as it does
for gRPC errors (codes mapped to HTTP statuses).

Gevent (Locust): nothing here creates a channel at import time, so
``grpc.experimental.gevent.init_gevent()`` may be called any time before a `GrpcClient` is made.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import grpc

from client import KOAClientError, _check_options, _env_token, call_with_retry, error_from_answer, new_key

log = logging.getLogger(__name__)

# HTTP status of each gRPC code, after the mapping in grpc-gateway / google.rpc.Code's documentation.
GRPC_TO_HTTP = {
    "OK": 200,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
    "UNAUTHENTICATED": 401,
}
# Large DICOM files: match the server's max_request_size (config.properties) rather than gRPC's 4 MiB.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def load_stubs() -> tuple[Any, Any, Any]:
    """The generated ``inference_pb2``, ``inference_pb2_grpc`` and protobuf's ``empty_pb2`` modules."""
    try:
        from google.protobuf import empty_pb2

        from client._proto import inference_pb2, inference_pb2_grpc
    except ImportError as exc:
        raise RuntimeError(
            f"the gRPC stubs are missing ({exc}): run `python -m client.gen_proto` (or `make proto`)"
        ) from exc
    return inference_pb2, inference_pb2_grpc, empty_pb2


def rpc_error(exc: grpc.RpcError) -> KOAClientError:
    """A KOAClientError for a failed call: the gRPC code as an HTTP status, its name in the message."""
    code = exc.code() if hasattr(exc, "code") else None
    name = code.name if code is not None else "UNKNOWN"
    details = str(exc.details() if hasattr(exc, "details") else "") or str(exc)
    status = GRPC_TO_HTTP.get(name, 500)
    if "ModelNotFoundException" in details:  # TorchServe sends INTERNAL for an unknown model name
        status = 404
    elif name in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        details += " (the token is missing, wrong or expired: keys expire after 60 min, re-read key_file.json)"
    return KOAClientError(status, f"gRPC {name}: {details}", name)


class GrpcClient:
    """KOA-Serve over TorchServe's gRPC inference API.

    Args:
        target: ``host:port`` of the gRPC inference address (``grpc_inference_port``).
        token: the inference key, sent as ``authorization: Bearer <key>`` metadata; None uses
            ``KOA_TOKEN`` when set, else sends none. See `client.load_token`.
        model: the registered model name.
        timeout: seconds to wait for an answer.
        key_file, retry_s: as `client.rest.RestClient` (``UNAVAILABLE`` counts as 503).
    """

    def __init__(
        self,
        target: str = "127.0.0.1:7070",
        token: str | None = None,
        model: str = "oamen",
        timeout: float = 60,
        *,
        key_file: str | os.PathLike[str] | None = None,
        retry_s: float = 0.0,
    ) -> None:
        self._pb2, pb2_grpc, self._empty = load_stubs()
        self.target = target
        self.model = model
        self.timeout = timeout
        self.key_file = key_file
        self.retry_s = retry_s
        self.token = token or _env_token() or new_key(key_file, None)
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {self.token}"),) if self.token else ()
        self.channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self.stub = pb2_grpc.InferenceAPIsServiceStub(self.channel)

    def _refresh_key(self) -> bool:
        """Take the key file's key; True when it differs from the one sent so far."""
        key = new_key(self.key_file, self.token)
        if key is not None:
            self.token, self.metadata = key, (("authorization", f"Bearer {key}"),)
        return key is not None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self, image: bytes, *, explain: bool = False, target: int | str | None = None, method: str | None = None
    ) -> Any:
        """The ``PredictionsRequest`` that `predict` sends (useful to Locust users that time the call)."""
        _check_options(image, target, method)
        inputs = {"data": bytes(image)}
        if explain:
            inputs["explain"] = b"true"
        if target is not None:
            inputs["target"] = str(target).encode()
        if method is not None:
            inputs["method"] = method.encode()
        return self._pb2.PredictionsRequest(model_name=self.model, input=inputs)

    def predict(
        self, image: bytes, *, explain: bool = False, target: int | str | None = None, method: str | None = None
    ) -> dict[str, Any]:
        """Grade one image (PNG, JPEG or DICOM bytes); explain it when asked.

        Args and answer as `client.rest.RestClient.predict`.

        Raises:
            KOAClientError: a gRPC error, or the handler's error body.
        """
        req = self.request(image, explain=explain, target=target, method=method)
        return call_with_retry(lambda: self._predict_once(req), self.retry_s, self._refresh_key)

    def _predict_once(self, req: Any) -> dict[str, Any]:
        try:
            resp = self.stub.Predictions(req, timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise rpc_error(exc) from None
        return parse_prediction(resp.prediction)

    def ping(self) -> dict[str, Any]:
        """TorchServe's health answer, e.g. ``{"status": "Healthy"}``."""
        try:
            resp = self.stub.Ping(self._empty.Empty(), timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise rpc_error(exc) from None
        try:
            health = json.loads(resp.health)
        except ValueError:
            return {"status": resp.health}
        return health if isinstance(health, dict) else {"status": health}


def parse_prediction(body: bytes) -> dict[str, Any]:
    """The answer in a ``PredictionResponse.prediction``; raises KOAClientError for an error body."""
    try:
        answer = json.loads(body)
    except ValueError:
        raise KOAClientError(502, f"prediction is not JSON: {body[:200]!r}", "bad_answer") from None
    if not isinstance(answer, dict):
        raise KOAClientError(502, f"prediction is not a JSON object: {body[:200]!r}", "bad_answer")
    if "error" in answer or ("code" in answer and "message" in answer):
        # The HTTP status is not carried over gRPC: take the one the body names, else 500.
        err = error_from_answer(500, body)
        log.debug("error body over gRPC: %s", err)
        raise err
    return answer
