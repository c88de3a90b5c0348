"""KOA-Serve client: grade knee radiographs on a running KOA-Serve TorchServe over REST or gRPC.

A hospital integrator installs this package alone: it needs ``requests`` (REST) and, for gRPC,
``grpcio`` + ``protobuf`` plus the stubs made by ``python -m client.gen_proto``. It never imports
the model, training or handler code.

    from client import RestClient, load_token
    answer = RestClient(token=load_token(key_file="logs/serve/key_file.json")).predict(png_bytes)
    answer["kl_grade"], answer["probabilities"]

``GrpcClient`` is imported lazily, so REST-only users need no ``grpcio``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

__all__ = ["KOAClientError", "load_token", "read_key_file", "call_with_retry", "RestClient", "GrpcClient", "TOKEN_ENV"]

TOKEN_ENV = "KOA_TOKEN"
# Statuses worth sending the same request again: 503 is TorchServe's "no worker / queue full / server
# restarting" and what the clients report when the server cannot be reached. Grading is a pure function
# of the image, so a request sent twice cannot do harm.
RETRY_STATUSES = frozenset({503})
# Answers that mean "this key is not (or no longer) valid": TorchServe writes new keys at every start and
# they expire after 60 minutes, so a client that knows the key file re-reads it once and tries again.
KEY_ERRORS = frozenset({"InvalidKeyException", "UNAUTHENTICATED", "PERMISSION_DENIED"})
MAX_BACKOFF_S = 2.0

log = logging.getLogger(__name__)
T = TypeVar("T")

if TYPE_CHECKING:
    from client.grpc_client import GrpcClient
    from client.rest import RestClient


class KOAClientError(Exception):
    """The server refused or failed a request (or could not be reached).

    Attributes:
        status: HTTP status (gRPC codes are mapped to their HTTP equivalent; 503 when the server
            cannot be reached, 504 on timeout).
        message: the server's own message when it sent one.
        kind: the error type the server named (``bad_request``, ``invalid_image``,
            ``InvalidKeyException``, a gRPC code name...), or None.
    """

    def __init__(self, status: int, message: str, kind: str | None = None) -> None:
        super().__init__(status, message, kind)
        self.status = int(status)
        self.message = message
        self.kind = kind

    def __str__(self) -> str:
        return f"{self.status} {self.kind}: {self.message}" if self.kind else f"{self.status}: {self.message}"


def load_token(token: str | None = None, key_file: str | os.PathLike[str] | None = None) -> str:
    """The inference key to send as ``Authorization: Bearer <key>``.

    Precedence: ``token`` > the ``KOA_TOKEN`` environment variable > ``key_file``'s
    ``["inference"]["key"]`` (the ``key_file.json`` TorchServe writes where it starts).

    Raises:
        RuntimeError: no token anywhere, or an unreadable / malformed key file.
    """
    if token:
        return token
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return env
    if key_file is None:
        raise RuntimeError(
            f"no inference token: pass one (--token), set {TOKEN_ENV}, or point to the server's key_file.json "
            "(--key-file logs/serve/key_file.json; `make token` prints it)"
        )
    return read_key_file(key_file)


def read_key_file(key_file: str | os.PathLike[str]) -> str:
    """The inference key in TorchServe's ``key_file.json`` (``["inference"]["key"]``).

    Raises:
        RuntimeError: the file is missing, unreadable or has no inference key.
    """
    path = Path(key_file)
    try:
        data: Any = json.loads(path.read_text())
    except FileNotFoundError:
        raise RuntimeError(
            f"key file {path} not found: is TorchServe running from {path.parent}? (`make serve`)"
        ) from None
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"cannot read key file {path}: {exc}") from None
    try:
        key = data["inference"]["key"]
    except (KeyError, TypeError):
        raise RuntimeError(f"{path} has no inference key (expected {{'inference': {{'key': ...}}}})") from None
    if not isinstance(key, str) or not key:
        raise RuntimeError(f"{path}: the inference key is empty or not a string")
    return key


def _env_token() -> str | None:
    """``KOA_TOKEN`` when set: the clients' token when none is given (None: send no header)."""
    return os.environ.get(TOKEN_ENV, "").strip() or None


def _check_options(image: bytes, target: int | str | None, method: str | None) -> None:
    """Reject arguments of the wrong type before sending megabytes; the server checks the values.

    Raises:
        TypeError: ``image`` is not bytes, or ``method`` is not a string.
        ValueError: a negative or boolean ``target``.
    """
    if not isinstance(image, bytes | bytearray | memoryview):
        raise TypeError(f"image must be the file's bytes, got {type(image).__name__}")
    if method is not None and not isinstance(method, str):
        raise TypeError(f"method must be a string such as 'gradcam' or 'ig', got {type(method).__name__}")
    if isinstance(target, bool) or (isinstance(target, int) and target < 0):
        raise ValueError(f"target must be a KL grade (0-4) or a class name such as 'KL3', got {target!r}")


def new_key(key_file: str | os.PathLike[str] | None, current: str | None) -> str | None:
    """The key in ``key_file`` when it differs from ``current``; None when it does not, or cannot be read."""
    if key_file is None:
        return None
    try:
        key = read_key_file(key_file)
    except RuntimeError as exc:
        log.info("cannot re-read the key: %s", exc)
        return None
    return key if key != current else None


def is_key_error(exc: KOAClientError) -> bool:
    """The server refused the key (wrong, expired, or from before a restart)."""
    return exc.kind in KEY_ERRORS or exc.status in (401, 403)


def is_retryable(exc: KOAClientError) -> bool:
    """Worth sending again after a pause: the server was unreachable, or it answered 503."""
    return exc.status in RETRY_STATUSES


def call_with_retry(
    send: Callable[[], T],
    retry_s: float,
    refresh_key: Callable[[], bool] | None = None,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """``send()``, sent again while it fails with a retryable error and ``retry_s`` seconds are not up.

    Pauses grow from 0.1 s to ``MAX_BACKOFF_S``; the last pause is cut to end at the deadline, so a
    call gives up at most ``retry_s`` s (plus one request) after it began. A key error calls
    ``refresh_key`` (re-read the key file) and sends again when it returns True (a new key), at
    most three times per call. Any other error, or a retryable one after the deadline, is raised.
    """
    deadline = clock() + max(0.0, retry_s)
    pause, refreshes, attempt = 0.1, 0, 1
    while True:
        try:
            return send()
        except KOAClientError as exc:
            if is_key_error(exc) and refresh_key is not None and refreshes < 3 and refresh_key():
                refreshes += 1
                log.info("the server refused the key; sending again with the key file's new key")
                continue
            left = deadline - clock()
            if not is_retryable(exc) or left <= 0:
                if attempt > 1:
                    exc.message += f" (gave up after {attempt} attempts in {retry_s:g} s)"
                raise
            log.info("attempt %d failed (%s); again in %.1f s", attempt, exc, min(pause, left))
            sleep(min(pause, left))
            pause, attempt = min(pause * 2, MAX_BACKOFF_S), attempt + 1


def error_from_answer(status: int, body: bytes | str) -> KOAClientError:
    """A KOAClientError from an error answer's body.

    Understands KOA-Serve's ``{"error": {"status", "type", "message"}}``, TorchServe's own
    ``{"code", "type", "message"}`` and falls back to the raw text.
    """
    text = body.decode("utf-8", "replace") if isinstance(body, bytes | bytearray) else str(body)
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        err = data.get("error") if isinstance(data.get("error"), dict) else data
        if "message" in err:
            code = err.get("status", err.get("code", status))
            kind = err.get("type")
            message = str(err["message"])
            if kind == "InvalidKeyException":
                message += " (the token is missing, wrong or expired: keys expire after 60 min, re-read key_file.json)"
            return KOAClientError(code if isinstance(code, int) else status, message, kind)
    return KOAClientError(status, text.strip()[:2000] or "(empty answer)")


def __getattr__(name: str) -> Any:
    # Lazy exports: `import client` must not pull in requests or grpc before they are used (gRPC users
    # under Locust call grpc.experimental.gevent.init_gevent() first).
    if name == "RestClient":
        from client.rest import RestClient

        return RestClient
    if name == "GrpcClient":
        from client.grpc_client import GrpcClient

        return GrpcClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
