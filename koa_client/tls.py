"""Certificate and TLS problems told in words that say what to fix, for the REST and gRPC clients.

The clients learn most certificate problems from the error their TLS library raises; the helpers
here turn its words into a `KOAClientError` with `TLS_STATUS`, and probe the server once when a
connection was closed without a reason (a server refusing a client certificate under TLS 1.3 may
just close it, which reads the same as a server going down).
"""

from __future__ import annotations

import os
import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from koa_client.errors import TLS_STATUS, KOAClientError

__all__ = ["check_tls_files", "client_cert_refused", "tls_error", "TlsProbe", "probe_tls", "diagnose_closed"]

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


@dataclass(frozen=True)
class TlsProbe:
    """What `probe_tls` learned: ``plain`` (no TLS), ``refused`` (after or during the handshake) or ``ok``."""

    verdict: Literal["plain", "refused", "ok"]
    reason: str = ""


def probe_tls(
    host: str,
    port: int,
    *,
    cert_file: str | os.PathLike[str] | None = None,
    cert_key_file: str | os.PathLike[str] | None = None,
    alpn: str = "http/1.1",
    timeout: float = 2.0,
) -> TlsProbe | None:
    """How ``host:port`` takes a TLS handshake made like the client's (its certificate, its ALPN).

    The server's certificate is not checked here: the client's own handshake reports that. The
    probe learns whether the server speaks TLS, and whether it keeps a connection that carries this
    client certificate (or none): a server that refuses one may send an alert, or (gRPC's) just close.

    Returns:
        ``TlsProbe("plain", reason)`` when the server does not speak TLS, ``TlsProbe("refused", reason)``
        when it refused the connection after or during the handshake, ``TlsProbe("ok")`` when it kept
        it; None when nothing could be learned (refused connection, reset, timeout).
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
                    return TlsProbe("ok")
                except (ConnectionResetError, ssl.SSLEOFError):
                    data = b""
                if data:
                    return TlsProbe("ok")
                return TlsProbe("refused", "the server closed the connection after the handshake")
    except ssl.SSLError as exc:
        reason = str(exc.reason or exc)
        if "ALERT" in reason:
            return TlsProbe("refused", reason)
        if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST"):
            return TlsProbe("plain", reason)
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
    if not tls:
        if found.verdict == "plain":
            return None
        return KOAClientError(
            TLS_STATUS,
            f"{where} speaks TLS and this client sent plain text: use {tls_fix} (with --ca-file for a private CA)",
            "tls",
        )
    if found.verdict == "refused":
        return client_cert_refused(where, cert_file, found.reason)
    if found.verdict == "plain":
        return KOAClientError(TLS_STATUS, f"{where} does not speak TLS ({found.reason}): use {plain_fix}", "tls")
    return None
