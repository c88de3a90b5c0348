"""gRPC client of KOA-Serve: TorchServe's ``InferenceAPIsService`` (Ping, Predictions).

It uses the committed stubs of ``koa_client/_proto`` (``make proto``); the ``input`` map carries the
fields of a REST form, and a handler's error body (sent with status OK) is raised as `KOAClientError`.
``grpcs://host:port`` speaks TLS. docs/API.md ("Clients") has the details, gevent included.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc

from koa_client.errors import KEY_HINT, KOAClientError, error_from_answer
from koa_client.keys import env_token, new_key
from koa_client.options import option_fields
from koa_client.retry import call_with_retry
from koa_client.tls import check_tls_files, diagnose_closed, tls_error

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


@dataclass(frozen=True)
class Stubs:
    """The generated gRPC modules and protobuf's ``empty_pb2`` (the argument of Ping)."""

    inference_pb2: Any
    inference_pb2_grpc: Any
    empty_pb2: Any


def load_stubs() -> Stubs:
    """The generated ``inference_pb2``, ``inference_pb2_grpc`` and protobuf's ``empty_pb2`` modules."""
    try:
        from google.protobuf import empty_pb2

        # imported when first used: missing stubs get the error below, not an ImportError at import time
        from koa_client._proto import inference_pb2, inference_pb2_grpc
    except ImportError as exc:
        raise RuntimeError(
            f"the gRPC stubs are missing ({exc}): run `python -m koa_client.gen_proto` (or `make proto`)"
        ) from exc
    return Stubs(inference_pb2, inference_pb2_grpc, empty_pb2)


def rpc_error(exc: grpc.RpcError) -> KOAClientError:
    """A KOAClientError for a failed call: the gRPC code as an HTTP status, its name in the message."""
    code = exc.code() if hasattr(exc, "code") else None
    name = code.name if code is not None else "UNKNOWN"
    details = str(exc.details() if hasattr(exc, "details") else "") or str(exc)
    status = GRPC_TO_HTTP.get(name, 500)
    if "ModelNotFoundException" in details:  # TorchServe sends INTERNAL for an unknown model name
        status = 404
    elif name in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        details += f" {KEY_HINT}"
    return KOAClientError(status, f"gRPC {name}: {details}", name)


def split_target(target: str, tls: bool | None = None, tls_files: bool = False) -> tuple[str, bool]:
    """The channel address in ``target`` and whether the channel is TLS.

    ``grpcs://host:port`` is TLS, ``grpc://host:port`` plain text; a bare ``host:port`` (or a gRPC
    name such as ``dns:///host:port``) is TLS when ``tls`` is True or TLS files are given.

    Raises:
        ValueError: ``tls`` or TLS files contradict the target's scheme.
    """
    scheme, sep, rest = target.partition("://")
    address = target
    if sep and scheme in ("grpc", "grpcs"):
        address = rest.rstrip("/")
        if tls is not None and tls != (scheme == "grpcs"):
            raise ValueError(f"tls={tls} contradicts the target {target!r}")
        tls = scheme == "grpcs"
    if tls is None:
        tls = tls_files
    if tls_files and not tls:
        raise ValueError(
            f"ca_file, cert_file and cert_key_file need a TLS channel, but {target!r} is plain text: use grpcs://"
        )
    return address, tls


def _read(path: str | os.PathLike[str] | None) -> bytes | None:
    return Path(path).read_bytes() if path is not None else None


def _channel_state(channel: grpc.Channel) -> grpc.ChannelConnectivity | None:
    """The channel's connectivity now; None when this grpc cannot tell.

    grpc has no public call that answers without waiting (``subscribe`` starts a polling thread),
    so this reads the Cython channel that every grpc 1.x release has.
    """
    try:
        from grpc._common import CYGRPC_CONNECTIVITY_STATE_TO_CHANNEL_CONNECTIVITY as states

        return states[channel._channel.check_connectivity_state(False)]  # type: ignore[attr-defined]
    except (AttributeError, ImportError, KeyError, TypeError):
        return None


class GrpcClient:
    """KOA-Serve over TorchServe's gRPC inference API.

    Args:
        target: ``host:port`` of the gRPC inference address (``grpc_inference_port``);
            ``grpcs://host:port`` for TLS.
        token: the inference key, sent as ``authorization: Bearer <key>`` metadata; None uses
            ``KOA_TOKEN`` when set, else sends none. See `koa_client.load_token`.
        model: the registered model name.
        timeout: seconds to wait for an answer.
        key_file, retry_s: as `koa_client.rest.RestClient` (``UNAVAILABLE`` counts as 503, and so does a
            call that found no connection within ``timeout``).
        tls: open a TLS channel to a bare ``host:port``; None (default): TLS for ``grpcs://`` or
            when a TLS file is given.
        ca_file, cert_file, cert_key_file: as `koa_client.rest.RestClient`.

    Raises:
        ValueError: ``tls`` or TLS files contradict the target's scheme, or a key without a certificate.
        RuntimeError: a TLS file is missing or unusable.
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
        tls: bool | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        cert_file: str | os.PathLike[str] | None = None,
        cert_key_file: str | os.PathLike[str] | None = None,
    ) -> None:
        stubs = load_stubs()
        self._pb2, pb2_grpc, self._empty = stubs.inference_pb2, stubs.inference_pb2_grpc, stubs.empty_pb2
        files = (ca_file, cert_file, cert_key_file)
        self.where = target
        self.target, self.tls = split_target(target, tls, any(f is not None for f in files))
        check_tls_files(*files)
        self.ca_file, self.cert_file, self.cert_key_file = files
        self.model = model
        self.timeout = timeout
        self.key_file = key_file
        self.retry_s = retry_s
        self.token = token or env_token() or new_key(key_file, None)
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {self.token}"),) if self.token else ()
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        if self.tls:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(ca_file),
                # a key kept in the certificate's file: gRPC takes the key's PEM block from it
                private_key=_read(cert_key_file or cert_file) if cert_file is not None else None,
                certificate_chain=_read(cert_file),
            )
            self.channel = grpc.secure_channel(self.target, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(self.target, options=options)
        self._answered = False  # once the server has answered, a closed connection needs no TLS probe
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
        self,
        image: bytes,
        *,
        explain: bool = False,
        target: int | str | None = None,
        method: str | None = None,
        site: str | None = None,
    ) -> Any:
        """The ``PredictionsRequest`` that `predict` sends (useful to Locust users that time the call); ``site``
        travels as the ``site`` input, which picks the site profile as REST's ``X-KOA-Site`` header does."""
        options = option_fields(image, target, method, site)
        inputs = {"data": bytes(image)}
        if explain:
            inputs["explain"] = b"true"
        inputs.update((name, value.encode()) for name, value in options.items())
        return self._pb2.PredictionsRequest(model_name=self.model, input=inputs)

    def predict(
        self,
        image: bytes,
        *,
        explain: bool = False,
        target: int | str | None = None,
        method: str | None = None,
        site: str | None = None,
    ) -> dict[str, Any]:
        """Grade one image (PNG, JPEG or DICOM bytes); explain it when asked.

        Args and answer as `koa_client.rest.RestClient.predict`.

        Raises:
            KOAClientError: a gRPC error, or the handler's error body.
        """
        req = self.request(image, explain=explain, target=target, method=method, site=site)
        return call_with_retry(lambda: self._predict_once(req), self.retry_s, self._refresh_key)

    def _predict_once(self, req: Any) -> dict[str, Any]:
        return parse_prediction(self._call(self.stub.Predictions, req).prediction)

    def ping(self) -> dict[str, Any]:
        """TorchServe's health answer, e.g. ``{"status": "Healthy"}``."""
        resp = self._call(self.stub.Ping, self._empty.Empty())
        try:
            health = json.loads(resp.health)
        except ValueError:
            return {"status": resp.health}
        return health if isinstance(health, dict) else {"status": health}

    def _call(self, rpc: Callable[..., Any], request: Any) -> Any:
        try:
            resp = rpc(request, timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        self._answered = True
        return resp

    def _error(self, exc: grpc.RpcError) -> KOAClientError:
        """`rpc_error`, told apart further when the call may never have reached the server.

        ``UNAVAILABLE`` whose details name a certificate problem is that problem (not retried); a
        closed socket before any answer is probed for a refused client certificate or a TLS/plain
        mismatch; ``DEADLINE_EXCEEDED`` on a channel that never connected sent nothing, so it is
        retryable (503) like ``UNAVAILABLE``.
        """
        code = exc.code() if hasattr(exc, "code") else None
        if code == grpc.StatusCode.UNAVAILABLE:
            details = str(exc.details() if hasattr(exc, "details") else exc)
            found = tls_error(details, self.where, cert_file=self.cert_file, plain_fix="host:port without grpcs://")
            if found is None and any(w in details.lower() for w in ("socket closed", "connection reset")):
                found = self._diagnose()
            if found is not None:
                return found
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
            state = _channel_state(self.channel)
            if state is not None and state != grpc.ChannelConnectivity.READY:
                msg = (
                    f"gRPC: no connection to {self.where} within {self.timeout} s, so nothing was sent: "
                    "is the server up, and the address right?"
                )
                return KOAClientError(503, msg, "unreachable")
        elif code is not None:
            self._answered = True
        return rpc_error(exc)

    def _diagnose(self) -> KOAClientError | None:
        """`diagnose_closed` for this target, until the server has answered once."""
        if self._answered:
            return None
        try:
            parts = urlsplit(f"//{self.target}")
            host, port = parts.hostname, parts.port
        except ValueError:  # a gRPC name such as dns:///host:port or unix:path: nothing to probe
            return None
        if not host or port is None:
            return None
        return diagnose_closed(
            host,
            port,
            tls=self.tls,
            where=self.where,
            cert_file=self.cert_file,
            cert_key_file=self.cert_key_file,
            tls_fix=f"grpcs://{self.target}",
            plain_fix="host:port without grpcs://",
            alpn="h2",
            timeout=min(self.timeout, 2.0),
        )


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
