"""The inference key: from the caller, ``KOA_TOKEN`` or TorchServe's ``key_file.json``, re-read when refused.

TorchServe writes new keys at every start and they expire after 60 minutes, so a client that knows
the key file reads it again when the server refuses its key (docs/API.md, docs/OPERATIONS.md).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from koa_client.errors import KOAClientError

__all__ = ["TOKEN_ENV", "load_token", "read_key_file", "env_token", "new_key", "is_key_error"]

TOKEN_ENV = "KOA_TOKEN"
# Answers that mean "this key is not (or no longer) valid": TorchServe writes new keys at every start and
# they expire after 60 minutes, so a client that knows the key file re-reads it once and tries again.
KEY_ERRORS = frozenset({"InvalidKeyException", "UNAUTHENTICATED", "PERMISSION_DENIED"})

log = logging.getLogger(__name__)


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
    env = os.environ.get(TOKEN_ENV, "").strip()
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


def env_token() -> str | None:
    """``KOA_TOKEN`` when set: the clients' token when none is given (None: send no header)."""
    return os.environ.get(TOKEN_ENV, "").strip() or None


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
