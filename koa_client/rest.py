"""REST client of KOA-Serve: ``POST /predictions/<model>`` and ``/explanations/<model>`` on TorchServe.

The image goes as the raw body with a content type sniffed from its magic bytes, or beside the
options as multipart form fields; an ``https://`` URL speaks TLS. docs/API.md ("Clients") says what
is sent, which CAs are trusted and what is resent.
"""

from __future__ import annotations

import logging
import os
import ssl
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3

from koa_client.errors import TLS_STATUS, KOAClientError, error_from_answer
from koa_client.keys import env_token, new_key
from koa_client.options import SITE_HEADER, option_fields
from koa_client.retry import call_with_retry
from koa_client.tls import check_tls_files, client_cert_refused, diagnose_closed, tls_error

log = logging.getLogger(__name__)
# nginx, a common TLS front for TorchServe, reports these TLS problems as a 400 page, not in the handshake.
NGINX_PLAIN_TO_TLS = b"The plain HTTP request was sent to HTTPS port"
NGINX_NO_CLIENT_CERT = b"No required SSL certificate was sent"
NGINX_BAD_CLIENT_CERT = b"The SSL certificate error"


def sniff_content_type(image: bytes) -> str:
    """The content type that names ``image``'s format: PNG, JPEG, DICOM or octet-stream."""
    if image.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if image.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if image[128:132] == b"DICM":
        return "application/dicom"
    return "application/octet-stream"


class RestClient:
    """KOA-Serve over TorchServe's REST inference API.

    Args:
        url: the inference address (``inference_address`` of config.properties).
        token: the inference key; None uses ``KOA_TOKEN`` when set, else sends no Authorization
            header (a server started with token authorization off). See `koa_client.load_token`.
        model: the registered model name.
        timeout: seconds to wait for an answer (explanations with ``ig`` take seconds on a CPU).
        key_file: TorchServe's ``key_file.json``: the token when none is given, and re-read when the
            server refuses the key (a restarted server has new keys; keys expire after 60 min).
        retry_s: for this many seconds, send a request again when the server cannot be reached
            (refused, or no connection within ``timeout``) or answers 503 (restarting, no worker yet,
            queue full). 0 (default): fail at once. Certificate errors are never retried.
        ca_file: PEM bundle of the CAs that sign the server's certificate (a private CA), trusted
            instead of the system's; ``https://`` URLs only.
        cert_file: PEM client certificate for a server that requires one (mutual TLS); it may hold
            its key too.
        cert_key_file: ``cert_file``'s unencrypted PEM key, when in a file of its own.

    Raises:
        ValueError: TLS files with an ``http://`` URL, or a key without a certificate.
        RuntimeError: a TLS file is missing or unusable.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8080",
        token: str | None = None,
        model: str = "oamen",
        timeout: float = 60,
        *,
        key_file: str | os.PathLike[str] | None = None,
        retry_s: float = 0.0,
        ca_file: str | os.PathLike[str] | None = None,
        cert_file: str | os.PathLike[str] | None = None,
        cert_key_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        parts = urlsplit(self.url)
        self.tls = parts.scheme == "https"
        if not self.tls and (ca_file or cert_file or cert_key_file):
            raise ValueError(f"ca_file, cert_file and cert_key_file need an https:// URL, got {url!r}")
        check_tls_files(ca_file, cert_file, cert_key_file)
        self.ca_file, self.cert_file, self.cert_key_file = ca_file, cert_file, cert_key_file
        self.model = model
        self.timeout = timeout
        self.key_file = key_file
        self.retry_s = retry_s
        self.session = requests.Session()
        # verify goes with each request, not on the session: requests lets REQUESTS_CA_BUNDLE override a
        # session's verify, and an explicit ca_file must win.
        self._verify: dict[str, Any] = {"verify": os.fspath(ca_file)} if ca_file is not None else {}
        if cert_file is not None:
            cert = os.fspath(cert_file)
            self.session.cert = (cert, os.fspath(cert_key_file)) if cert_key_file is not None else cert
        self._answered = False  # once the server has answered, a closed connection needs no TLS probe
        self.token = token or env_token() or new_key(key_file, None)
        if self.token:
            self.session.headers["Authorization"] = f"Bearer {self.token}"

    def _refresh_key(self) -> bool:
        """Take the key file's key; True when it differs from the one sent so far."""
        key = new_key(self.key_file, self.token)
        if key is not None:
            self.token = key
            self.session.headers["Authorization"] = f"Bearer {key}"
        return key is not None

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> RestClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        return call_with_retry(lambda: self._send_once(method, path, **kwargs), self.retry_s, self._refresh_key)

    def _send_once(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        url = f"{self.url}{path}"
        try:
            resp = self.session.request(method, url, timeout=self.timeout, **self._verify, **kwargs)
        except requests.ConnectTimeout as exc:
            # Caught before requests.Timeout, which it also is: no connection, so nothing was sent and
            # sending again is safe, as for a refused connection.
            msg = f"no connection to {url} within {self.timeout} s: is the server up, and the address right? ({exc})"
            raise KOAClientError(503, msg, "unreachable") from exc
        except requests.Timeout as exc:
            raise KOAClientError(504, f"no answer from {url} within {self.timeout} s: {exc}", "timeout") from exc
        except requests.exceptions.SSLError as exc:
            raise self._tls_failure(url, exc) from exc
        except requests.ConnectionError as exc:
            if isinstance(exc.args[0] if exc.args else None, urllib3.exceptions.ProtocolError):
                # Connected and sent, then reset or closed without an answer (e.g. a server stopping,
                # or one that refuses this client's certificate, or speaks TLS to a plain-text client).
                tls = self._diagnose()
                if tls is not None:
                    raise tls from exc
                msg = f"{url} closed the connection without answering (is the server restarting?): {exc}"
                raise KOAClientError(503, msg, "connection_lost") from exc
            raise KOAClientError(503, f"cannot reach {url}: is the server running? ({exc})", "unreachable") from exc
        self._answered = True
        if resp.status_code != 200:
            log.debug("%s %s -> %d %r", method, url, resp.status_code, resp.content[:500])
            if resp.status_code == 400:
                tls = self._nginx_tls_error(resp.content)
                if tls is not None:
                    raise tls
            if not resp.content:
                hint = " (the image exceeds the server's max_request_size)" if resp.status_code == 413 else ""
                raise KOAClientError(resp.status_code, f"{resp.reason or 'empty answer'}{hint}")
            raise error_from_answer(resp.status_code, resp.content)
        try:
            answer = resp.json()
        except ValueError as exc:
            raise KOAClientError(502, f"answer from {url} is not JSON: {resp.text[:200]!r}", "bad_answer") from exc
        if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
            raise error_from_answer(resp.status_code, resp.content)
        return answer

    def _tls_failure(self, url: str, exc: requests.exceptions.SSLError) -> KOAClientError:
        """The certificate or TLS problem behind ``exc``; a closed connection that names none stays retryable."""
        cause = _ssl_cause(exc)
        text = str(cause if cause is not None else exc)
        found = tls_error(text, self.url, cert_file=self.cert_file, plain_fix="an http:// URL") or self._diagnose()
        if found is not None:
            return found
        msg = (
            f"{url}: the TLS connection failed ({text}); if the server requires a client certificate, "
            "pass --cert-file and --cert-key-file"
        )
        return KOAClientError(503, msg, "connection_lost")

    def _nginx_tls_error(self, body: bytes) -> KOAClientError | None:
        """The TLS problem named by an nginx 400 page, if it is one."""
        if NGINX_PLAIN_TO_TLS in body:
            msg = f"{self.url}: the server speaks TLS and this client sent plain text (nginx): use an https:// URL"
            return KOAClientError(TLS_STATUS, msg, "tls")
        if NGINX_NO_CLIENT_CERT in body and self.cert_file is None:
            return client_cert_refused(self.url, None, f"nginx: {NGINX_NO_CLIENT_CERT.decode()}")
        if NGINX_BAD_CLIENT_CERT in body or NGINX_NO_CLIENT_CERT in body:
            return client_cert_refused(self.url, self.cert_file, f"nginx: {NGINX_BAD_CLIENT_CERT.decode()}")
        return None

    def _diagnose(self) -> KOAClientError | None:
        """`diagnose_closed` for this server, until it has answered once (then its TLS setup is right)."""
        if self._answered:
            return None
        parts = urlsplit(self.url)
        try:
            host, port = parts.hostname, parts.port or (443 if self.tls else 80)
        except ValueError:
            return None
        if not host:
            return None
        return diagnose_closed(
            host,
            port,
            tls=self.tls,
            where=self.url,
            cert_file=self.cert_file,
            cert_key_file=self.cert_key_file,
            tls_fix="an https:// URL",
            plain_fix="an http:// URL",
            timeout=min(self.timeout, 2.0),
        )

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

        Args:
            image: the file's bytes.
            explain: add ``explanation`` (attribution grid and overlay PNG) to the answer.
            target: grade (0-4) or class name to explain; default: the predicted grade.
            method: ``layercam`` (the server's default), ``gradcam``, ``ig``, ``ig_blur``, ``smoothgrad`` or
                ``occlusion`` (docs/EXPLAIN.md).
            site: the hospital whose site profile should answer (the ``X-KOA-Site`` header, docs/SITES.md);
                the answer's ``model.profile`` says which calibration did.

        Returns:
            The server's answer: ``kl_grade``, ``class_name``, ``label``, ``probabilities`` (5),
            ``oa_probability``, ``model`` and, when explained, ``explanation``.

        Raises:
            KOAClientError: the server refused or failed the request, or could not be reached.
        """
        options = option_fields(image, target, method)
        path = f"/{'explanations' if explain else 'predictions'}/{self.model}"
        ctype = sniff_content_type(bytes(image[:132]))
        site_header = {SITE_HEADER: site} if site else {}
        if not options:
            return self._send("POST", path, data=bytes(image), headers={"Content-Type": ctype, **site_header})
        fields = {"explain": "true" if explain else "false", **options}
        files = {"data": ("image", bytes(image), ctype)}
        return self._send("POST", path, files=files, data=fields, **({"headers": site_header} if site else {}))

    def ping(self) -> dict[str, Any]:
        """TorchServe's health answer, e.g. ``{"status": "Healthy"}`` (needs the token too)."""
        return self._send("GET", "/ping")


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    """The `ssl.SSLError` inside requests' and urllib3's wrappers (their ``reason`` and ``args``), if any."""
    stack: list[Any] = [exc]
    seen: set[int] = set()
    while stack:
        err = stack.pop()
        if not isinstance(err, BaseException) or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, ssl.SSLError):
            return err
        stack += [err.__cause__, err.__context__, getattr(err, "reason", None), *err.args]
    return None
