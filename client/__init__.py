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
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

__all__ = ["KOAClientError", "load_token", "RestClient", "GrpcClient", "TOKEN_ENV"]

TOKEN_ENV = "KOA_TOKEN"

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
        super().__init__(f"{status} {kind}: {message}" if kind else f"{status}: {message}")
        self.status = int(status)
        self.message = message
        self.kind = kind


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
