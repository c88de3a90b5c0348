"""Sending a request again while the server is unreachable or answers 503, for at most ``retry_s`` seconds.

Grading is a pure function of the image, so a request sent twice cannot do harm; a certificate
error or a timeout after the request was sent is never retried (docs/API.md, docs/RELIABILITY.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from koa_client.errors import KOAClientError
from koa_client.keys import is_key_error

__all__ = ["RETRY_STATUSES", "MAX_BACKOFF_S", "is_retryable", "call_with_retry"]

# Statuses worth sending the same request again: 503 is TorchServe's "no worker / queue full / server
# restarting" and what the clients report when the server cannot be reached. Grading is a pure function
# of the image, so a request sent twice cannot do harm.
RETRY_STATUSES = frozenset({503})
MAX_BACKOFF_S = 2.0

log = logging.getLogger(__name__)
T = TypeVar("T")


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
