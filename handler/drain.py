"""Graceful stop: the handler's side of the drain that `ops.server.stop` runs before it stops Java.

The worker and ops.server meet in ``$KOA_STATE_DIR``: the worker holds ``busy.<pid>`` around each batch
and answers 503 ``restarting`` once ``draining`` exists, so no batch is cut off mid-work; unset, the gate
does nothing. The handshake: docs/MODEL.md, "Draining".
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from model.settings import STATE_DIR

STATE_ENV = STATE_DIR.name
DRAIN_FILE = "draining"
BUSY_PREFIX = "busy."
RETRY_AFTER_S = 2


class DrainGate:
    """The worker's side; ``state_dir`` None (default: ``$KOA_STATE_DIR``, unset: off) makes it a no-op."""

    def __init__(self, state_dir: str | os.PathLike[str] | None = None) -> None:
        state_dir = state_dir if state_dir is not None else STATE_DIR.get() or None
        self.dir = Path(state_dir) if state_dir else None
        self.busy = self.dir / f"{BUSY_PREFIX}{os.getpid()}" if self.dir else None

    @contextlib.contextmanager
    def batch(self) -> Iterator[bool]:
        """Hold ``busy`` around one batch; yields True when the server is draining (answer 503)."""
        if self.dir is None or self.busy is None:
            yield False
            return
        try:
            self.busy.touch()
        except OSError:  # a state folder that vanished must not fail the requests
            yield False
            return
        try:
            yield (self.dir / DRAIN_FILE).exists()
        finally:
            self.busy.unlink(missing_ok=True)
