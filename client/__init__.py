"""KOA-Serve client: grade knee radiographs on a running KOA-Serve TorchServe over REST or gRPC.

A hospital integrator installs this package alone: it needs ``requests`` (REST) and, for gRPC,
``grpcio`` + ``protobuf`` and the committed stubs in ``client/_proto`` (``make proto`` regenerates
them). It never imports the model, training or handler code.

    from client import RestClient, load_token
    answer = RestClient(token=load_token(key_file="logs/serve/key_file.json")).predict(png_bytes)
    answer["kl_grade"], answer["probabilities"]

``GrpcClient`` is imported lazily, so REST-only users need no ``grpcio``.

Behind TLS (a proxy or load balancer in front of TorchServe): ``RestClient("https://...")`` or
``GrpcClient("grpcs://host:port")``, with ``ca_file=`` for a private CA and ``cert_file=`` /
``cert_key_file=`` for mutual TLS. A certificate the client cannot trust, or a client certificate
the server refuses, raises `KOAClientError` with status `TLS_STATUS` and kind ``certificate`` (or
``tls`` when one side does not speak TLS) at once, never retried: no wait makes it right.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from client.settings import TOKEN

__all__ = [
    "KOAClientError",
    "load_token",
    "read_key_file",
    "call_with_retry",
    "RestClient",
    "GrpcClient",
    "TOKEN_ENV",
    "TLS_STATUS",
]

TOKEN_ENV = TOKEN.name
# Statuses worth sending the same request again: 503 is TorchServe's "no worker / queue full / server
# restarting" and what the clients report when the server cannot be reached. Grading is a pure function
# of the image, so a request sent twice cannot do harm.
RETRY_STATUSES = frozenset({503})
# Answers that mean "this key is not (or no longer) valid": TorchServe writes new keys at every start and
# they expire after 60 minutes, so a client that knows the key file re-reads it once and tries again.
KEY_ERRORS = frozenset({"InvalidKeyException", "UNAUTHENTICATED", "PERMISSION_DENIED"})
MAX_BACKOFF_S = 2.0
# Said with a refused key. TorchServe's keys expire; a cluster's token does not, but is rotated.
KEY_HINT = (
    "(the token is missing, wrong or expired: re-read key_file.json, which every restart and token rotation "
    "replaces; TorchServe's own keys also expire after 60 min)"
)
# Status of a TLS failure the clients diagnose themselves (nginx's "SSL Certificate Error"): outside
# RETRY_STATUSES, because an untrusted or refused certificate stays so however often it is sent.
TLS_STATUS = 495
TLS_KINDS = frozenset({"certificate", "tls"})

log = logging.getLogger(__name__)
T = TypeVar("T")

if TYPE_CHECKING:
    from client.grpc_client import GrpcClient
    from client.rest import RestClient


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


def load_token(
    token: str | None = None,
    key_file: str | os.PathLike[str] | None = None,
    wait_s: float = 0.0,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> str:
    """The inference key to send as ``Authorization: Bearer <key>``.

    Precedence: ``token`` > the ``KOA_TOKEN`` environment variable > ``key_file``'s
    ``["inference"]["key"]`` (the ``key_file.json`` TorchServe writes where it starts). A server
    that is restarting has no key file for a few seconds (TorchServe removes it when it stops and
    writes a new one when it starts): with ``wait_s`` the file is read again until it has a key or
    ``wait_s`` seconds are up.

    Raises:
        RuntimeError: no token anywhere, or an unreadable / malformed key file (after ``wait_s``).
    """
    if token:
        return token
    env = TOKEN.get().strip()
    if env:
        return env
    if key_file is None:
        raise RuntimeError(
            f"no inference token: pass one (--token), set {TOKEN_ENV}, or point to the server's key_file.json "
            "(--key-file logs/serve/key_file.json; `make token` prints it)"
        )
    deadline = clock() + max(0.0, wait_s)
    while True:
        try:
            return read_key_file(key_file)
        except RuntimeError as exc:
            left = deadline - clock()
            if left <= 0:
                if wait_s > 0:
                    raise RuntimeError(f"{exc} (waited {wait_s:g} s for it)") from None
                raise
            log.info("%s; reading it again", exc)
            sleep(min(0.5, left))


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
    return TOKEN.get().strip() or None


def _check_options(image: bytes, target: int | str | None, method: str | None) -> None:
    """Reject arguments of the wrong type before sending megabytes; the server checks the values.

    Raises:
        TypeError: ``image`` is not bytes, or ``method`` is not a string.
        ValueError: a negative or boolean ``target``.
    """
    if not isinstance(image, bytes | bytearray | memoryview):
        raise TypeError(f"image must be the file's bytes, got {type(image).__name__}")
    if method is not None and not isinstance(method, str):
        raise TypeError(f"method must be a string such as 'layercam' or 'ig', got {type(method).__name__}")
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
    """Worth sending again after a pause: the server was unreachable, or it answered 503.

    Never a certificate or TLS failure (`TLS_STATUS`), nor a timeout after the request was sent (504).
    """
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
                message += f" {KEY_HINT}"
            return KOAClientError(code if isinstance(code, int) else status, message, kind)
    return KOAClientError(status, text.strip()[:2000] or "(empty answer)")


# --- TLS -------------------------------------------------------------------------------------
# The clients learn most certificate problems from the error their TLS library raises; the helpers
# below turn its words into a message that says what to fix, and probe the server once when a
# connection was closed without a reason (a server refusing a client certificate under TLS 1.3 may
# just close it, which reads the same as a server going down).

PROBE_READ_S = 0.5  # how long a probe waits for a refusal after its handshake


def check_tls_files(
    ca_file: str | os.PathLike[str] | None,
    cert_file: str | os.PathLike[str] | None,
    cert_key_file: str | os.PathLike[str] | None,
) -> None:
    """Fail before the first request on a TLS file that is missing or unusable.

    Args:
        ca_file: PEM bundle of the CAs to trust instead of the system's (e.g. the hospital's CA).
        cert_file: PEM client certificate (chain) for mutual TLS; it may hold its key too.
        cert_key_file: the client certificate's unencrypted PEM key, when in a file of its own.

    Raises:
        ValueError: a key without a certificate.
        RuntimeError: a file is missing, holds no PEM certificate, or the key does not match.
    """
    if cert_key_file is not None and cert_file is None:
        raise ValueError("cert_key_file (--cert-key-file) is the key of a client certificate: pass cert_file too")
    for what, path in (("CA file", ca_file), ("client certificate", cert_file), ("client key", cert_key_file)):
        if path is not None and not Path(path).is_file():
            raise RuntimeError(f"{what} {path} not found (or not a file)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise RuntimeError(f"CA file {ca_file} holds no usable PEM certificate ({exc})") from None
    if cert_file is not None:
        try:  # the empty password makes an encrypted key fail here instead of prompting on the terminal
            ctx.load_cert_chain(cert_file, cert_key_file, password=lambda: b"")
        except (ssl.SSLError, OSError) as exc:
            key = f" with key {cert_key_file}" if cert_key_file is not None else ""
            raise RuntimeError(
                f"client certificate {cert_file}{key} cannot be used ({exc}): it must be PEM, with its private "
                "key (unencrypted) in cert_key_file or in the same file"
            ) from None


def _tls_reason(text: str) -> str:
    """The telling part of a TLS error's text (OpenSSL's, BoringSSL's or gRPC's)."""
    for pattern in (
        r"certificate verify failed: ([^(]+)",
        r"CERTIFICATE_VERIFY_FAILED: ([^:]+)",
        r"(Hostname Verification Check failed)",
        r"\[SSL: (\w+)\]",
        r"OPENSSL_internal:(\w+)",
    ):
        match = re.search(pattern, text)
        if match:
            return match.group(1).strip().rstrip(".")
    return text.strip()[:300]


def client_cert_refused(where: str, cert_file: str | os.PathLike[str] | None, reason: str) -> KOAClientError:
    """The error for a server that refused the TLS connection because of the client's certificate (or its lack)."""
    if cert_file is None:
        msg = (
            f"{where} refused the TLS connection without a client certificate ({reason}): pass one and its key "
            "(--cert-file, --cert-key-file; cert_file=, cert_key_file=)"
        )
    else:
        msg = (
            f"{where} refused the client certificate {cert_file} ({reason}): it must be signed by a CA the server "
            "trusts, valid today, and issued for client authentication"
        )
    return KOAClientError(TLS_STATUS, msg, "certificate")


def tls_error(
    text: str, where: str, *, cert_file: str | os.PathLike[str] | None, plain_fix: str
) -> KOAClientError | None:
    """The certificate or TLS problem an error's text names, as an error that says what to fix.

    Args:
        text: the TLS library's error text (Python's ssl, or the details of a gRPC status).
        where: the server as the user named it (URL or gRPC target).
        cert_file: the client certificate this client sends, if any.
        plain_fix: how to reach the server in plain text (``an http:// URL``...).

    Returns:
        A `KOAClientError` with `TLS_STATUS` and kind ``certificate`` or ``tls``; None when the text
        names no TLS problem.
    """
    low = text.lower()
    reason = _tls_reason(text)
    # An alert is the server speaking about the client's certificate; our own checks say "verify".
    if "alert" in low and any(
        w in low for w in ("certificate", "unknown_ca", "unknown ca", "handshake_failure", "handshake failure")
    ):
        return client_cert_refused(where, cert_file, reason)
    if any(w in low for w in ("certificate verify failed", "certificate_verify_failed", "hostname verification")):
        if any(w in low for w in ("hostname mismatch", "ip address mismatch", "hostname verification")):
            what = "does not name the host connected to"
            fix = "connect by a name the certificate lists (its subjectAltName), or have it reissued for this name"
        elif "expired" in low or "not yet valid" in low:
            what, fix = "is expired or not yet valid", "renew the server's certificate, or correct this machine's clock"
        elif "purpose" in low:
            what, fix = "is not issued for a server", "reissue it with extendedKeyUsage serverAuth"
        else:
            what, fix = "is not signed by a CA this client trusts", "pass the CA that signed it (--ca-file, ca_file=)"
        return KOAClientError(TLS_STATUS, f"{where}: the server's certificate {what} ({reason}): {fix}", "certificate")
    if any(w in low for w in ("wrong_version_number", "wrong version number", "unknown protocol", "http_request")):
        return KOAClientError(TLS_STATUS, f"{where} does not speak TLS ({reason}): use {plain_fix}", "tls")
    return None


def probe_tls(
    host: str,
    port: int,
    *,
    cert_file: str | os.PathLike[str] | None = None,
    cert_key_file: str | os.PathLike[str] | None = None,
    alpn: str = "http/1.1",
    timeout: float = 2.0,
) -> tuple[str, str] | None:
    """How ``host:port`` takes a TLS handshake made like the client's (its certificate, its ALPN).

    The server's certificate is not checked here: the client's own handshake reports that. The
    probe learns whether the server speaks TLS, and whether it keeps a connection that carries this
    client certificate (or none): a server that refuses one may send an alert, or (gRPC's) just close.

    Returns:
        ``("plain", reason)`` when the server does not speak TLS, ``("refused", reason)`` when it
        refused the connection after or during the handshake, ``("ok", "")`` when it kept it; None when
        nothing could be learned (refused connection, reset, timeout).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols([alpn])
    if cert_file is not None:
        ctx.load_cert_chain(cert_file, cert_key_file, password=lambda: b"")
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=host) as conn:
                conn.settimeout(PROBE_READ_S)
                try:
                    data = conn.recv(1)
                except TimeoutError:  # waits for our request: the connection was kept
                    return "ok", ""
                except (ConnectionResetError, ssl.SSLEOFError):
                    data = b""
                return ("ok", "") if data else ("refused", "the server closed the connection after the handshake")
    except ssl.SSLError as exc:
        reason = str(exc.reason or exc)
        if "ALERT" in reason:
            return "refused", reason
        if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST"):
            return "plain", reason
        return None
    except OSError:
        return None


def diagnose_closed(
    host: str,
    port: int,
    *,
    tls: bool,
    where: str,
    cert_file: str | os.PathLike[str] | None,
    cert_key_file: str | os.PathLike[str] | None,
    tls_fix: str,
    plain_fix: str,
    alpn: str = "http/1.1",
    timeout: float = 2.0,
) -> KOAClientError | None:
    """The TLS cause of a connection that was closed without an answer, when a `probe_tls` finds one.

    A TLS client learns that the server refuses its certificate (or wants one); a plain-text client
    learns that the server speaks TLS. None: no TLS cause (a server going down, say), so the caller
    keeps its own error, retryable as before.
    """
    found = probe_tls(
        host, port, cert_file=cert_file if tls else None, cert_key_file=cert_key_file, alpn=alpn, timeout=timeout
    )
    if found is None:
        return None
    verdict, reason = found
    if not tls:
        if verdict == "plain":
            return None
        return KOAClientError(
            TLS_STATUS,
            f"{where} speaks TLS and this client sent plain text: use {tls_fix} (with --ca-file for a private CA)",
            "tls",
        )
    if verdict == "refused":
        return client_cert_refused(where, cert_file, reason)
    if verdict == "plain":
        return KOAClientError(TLS_STATUS, f"{where} does not speak TLS ({reason}): use {plain_fix}", "tls")
    return None


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
