"""The bearer tokens the balancer accepts (``tokens.lst``) and the clients' ``key_file.json``, both
written readable by their owner only."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

TOKENS_FILE = "tokens.lst"
KEY_FILE = "key_file.json"


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (created with mode 600, never wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def new_token() -> str:
    """A fresh bearer token: 256 random bits, URL-safe (HAProxy's pattern file takes it as one word)."""
    return secrets.token_urlsafe(32)


def read_tokens(workdir: Path) -> list[str]:
    """The tokens the balancer accepts, newest last."""
    path = Path(workdir) / TOKENS_FILE
    if not path.is_file():
        return []
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def write_tokens(workdir: Path, tokens: list[str]) -> None:
    """``tokens.lst`` (accepted by the balancer) and ``key_file.json`` (the newest, for the clients)."""
    header = "# Bearer tokens the balancer accepts, one per line (ops/cluster/tokens.py; docs/DEPLOY.md)\n"
    write_private(Path(workdir) / TOKENS_FILE, header + "".join(f"{t}\n" for t in tokens))
    # TorchServe's key-file shape, so that --key-file / KOA_KEY_FILE work as against one server.
    key = {"inference": {"key": tokens[-1]}, "management": {"key": ""}, "API": {"key": ""}}
    write_private(Path(workdir) / KEY_FILE, json.dumps(key, indent=2) + "\n")


def ensure_token(workdir: Path) -> str:
    """The current token; one is made at the first start and kept across restarts of the cluster."""
    tokens = read_tokens(workdir)
    if not tokens:
        tokens = [new_token()]
        write_tokens(workdir, tokens)
    return tokens[-1]
