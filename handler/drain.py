"""Graceful stop: the handler's side of the drain that `ops.server.stop` runs before it stops Java.

TorchServe drops the connections it holds the moment Java is told to stop, so a request the
worker is grading then gets a reset. To finish that work first, the server is started with
``KOA_STATE_DIR`` (a folder) in its environment, and the two sides meet there:

- the worker creates ``busy.<pid>`` before it looks at a batch and removes it when done;
- ``ops.server.stop`` creates ``draining`` and waits until no live worker holds a ``busy`` file:
  the batches being graded are answered, and every batch the worker takes after that gets
  **503** ``restarting`` (with ``Retry-After``) at once, which a client may send again.

The worker checks ``draining`` after it has created its ``busy`` file, so a batch that missed the
``draining`` file still holds ``busy`` when ``ops.server`` looks: nothing is cut off mid-work. Without
``KOA_STATE_DIR`` (a handler run elsewhere) the gate does nothing. Costs two file operations per batch.
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
