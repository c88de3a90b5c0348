"""The client's one exception, `KOAClientError`, and how a server's error answer becomes one.

Statuses are HTTP's (gRPC codes are mapped to them); `TLS_STATUS` marks a certificate or TLS failure
the client diagnosed itself. docs/API.md lists the server's error types.
"""

from __future__ import annotations

import json

__all__ = ["KOAClientError", "error_from_answer", "KEY_HINT", "TLS_STATUS", "TLS_KINDS"]

# Said with a refused key. TorchServe's keys expire; a cluster's token does not, but is rotated.
KEY_HINT = (
    "(the token is missing, wrong or expired: re-read key_file.json, which every restart and token rotation "
    "replaces; TorchServe's own keys also expire after 60 min)"
)
# Status of a TLS failure the clients diagnose themselves (nginx's "SSL Certificate Error"): outside
# retry.RETRY_STATUSES, because an untrusted or refused certificate stays so however often it is sent.
TLS_STATUS = 495
TLS_KINDS = frozenset({"certificate", "tls"})


class KOAClientError(Exception):
    """The server refused or failed a request (or could not be reached).

    Attributes:
        status: HTTP status (gRPC codes are mapped to their HTTP equivalent; 503 when the server
            cannot be reached, 504 on timeout, `TLS_STATUS` for a certificate or TLS failure).
        message: the server's own message when it sent one.
        kind: the error type the server named (``bad_request``, ``invalid_image``,
            ``InvalidKeyException``, a gRPC code name...), the client's own (``unreachable``,
            ``timeout``, ``certificate``, ``tls``...), or None.
    """

    def __init__(self, status: int, message: str, kind: str | None = None) -> None:
        super().__init__(status, message, kind)
        self.status = int(status)
        self.message = message
        self.kind = kind

    def __str__(self) -> str:
        return f"{self.status} {self.kind}: {self.message}" if self.kind else f"{self.status}: {self.message}"


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
                message += f" {KEY_HINT}"
            return KOAClientError(code if isinstance(code, int) else status, message, kind)
    return KOAClientError(status, text.strip()[:2000] or "(empty answer)")
