"""REST client of KOA-Serve: ``POST /predictions/<model>`` and ``/explanations/<model>`` on TorchServe.

Plain predictions send the image as the raw body with an image content type (sniffed from its
magic bytes: ``image/png``, ``image/jpeg``, ``application/dicom``; ``application/octet-stream``
otherwise). A body without a content type is read by TorchServe as a URL-encoded form and reaches
the handler as text, so the type is always set. Explanation options (``target``, ``method``) go as
multipart form fields beside the image in ``data``, as the handler (``handler/service.py``) reads them.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import requests
import urllib3

from client import KOAClientError, _check_options, _env_token, call_with_retry, error_from_answer, new_key

log = logging.getLogger(__name__)


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
            header (a server started with token authorization off). See `client.load_token`.
        model: the registered model name.
        timeout: seconds to wait for an answer (explanations with ``ig`` take seconds on a CPU).
        key_file: TorchServe's ``key_file.json``: the token when none is given, and re-read when the
            server refuses the key (a restarted server has new keys; keys expire after 60 min).
        retry_s: for this many seconds, send a request again when the server cannot be reached or
            answers 503 (restarting, no worker yet, queue full). 0 (default): fail at once.
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
    ) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.timeout = timeout
        self.key_file = key_file
        self.retry_s = retry_s
        self.session = requests.Session()
        self.token = token or _env_token() or new_key(key_file, None)
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
            resp = self.session.request(method, url, timeout=self.timeout, **kwargs)
        except requests.Timeout as exc:
            raise KOAClientError(504, f"no answer from {url} within {self.timeout} s: {exc}", "timeout") from exc
        except requests.ConnectionError as exc:
            if isinstance(exc.args[0] if exc.args else None, urllib3.exceptions.ProtocolError):
                # Connected and sent, then reset or closed without an answer (e.g. a server stopping).
                msg = f"{url} closed the connection without answering (is the server restarting?): {exc}"
                raise KOAClientError(503, msg, "connection_lost") from exc
            raise KOAClientError(503, f"cannot reach {url}: is the server running? ({exc})", "unreachable") from exc
        if resp.status_code != 200:
            log.debug("%s %s -> %d %r", method, url, resp.status_code, resp.content[:500])
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

    def predict(
        self, image: bytes, *, explain: bool = False, target: int | str | None = None, method: str | None = None
    ) -> dict[str, Any]:
        """Grade one image (PNG, JPEG or DICOM bytes); explain it when asked.

        Args:
            image: the file's bytes.
            explain: add ``explanation`` (attribution grid and overlay PNG) to the answer.
            target: grade (0-4) or class name to explain; default: the predicted grade.
            method: ``gradcam`` (default on the server) or ``ig`` (Integrated Gradients).

        Returns:
            The server's answer: ``kl_grade``, ``class_name``, ``label``, ``probabilities`` (5),
            ``oa_probability``, ``model`` and, when explained, ``explanation``.

        Raises:
            KOAClientError: the server refused or failed the request, or could not be reached.
        """
        _check_options(image, target, method)
        path = f"/{'explanations' if explain else 'predictions'}/{self.model}"
        ctype = sniff_content_type(bytes(image[:132]))
        if target is None and method is None:
            return self._send("POST", path, data=bytes(image), headers={"Content-Type": ctype})
        fields = {"explain": "true" if explain else "false"}
        if target is not None:
            fields["target"] = str(target)
        if method is not None:
            fields["method"] = method
        return self._send("POST", path, files={"data": ("image", bytes(image), ctype)}, data=fields)

    def ping(self) -> dict[str, Any]:
        """TorchServe's health answer, e.g. ``{"status": "Healthy"}`` (needs the token too)."""
        return self._send("GET", "/ping")
