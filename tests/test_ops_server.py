"""ops.server without a server: the drain handshake with the handler (handler/drain.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from handler.drain import BUSY_PREFIX, DRAIN_FILE, DrainGate
from ops import server as ts


def test_drain_waits_for_the_batch_in_progress(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    gate = DrainGate(tmp_path / "state")
    done = threading.Event()

    def batch() -> None:
        with gate.batch() as draining:
            assert draining is False
            ready.set()
            time.sleep(0.5)  # grading
        done.set()

    ready = threading.Event()
    threading.Thread(target=batch, daemon=True).start()
    ready.wait(5)
    waited = ts.drain(tmp_path, timeout=10)
    assert done.is_set() and 0.3 < waited < 5
    assert (tmp_path / "state" / DRAIN_FILE).is_file()
    with gate.batch() as draining:  # every later batch is turned away
        assert draining is True


def test_drain_ignores_a_dead_workers_busy_file_and_gives_up_at_the_timeout(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (state / f"{BUSY_PREFIX}{int(dead.stdout)}").touch()  # a SIGKILLed worker never removes its file
    (state / f"{BUSY_PREFIX}junk").touch()
    assert ts.drain(tmp_path, timeout=10) < 1
    (state / f"{BUSY_PREFIX}{os.getpid()}").touch()  # a live worker stuck in a batch
    assert 0.4 < ts.drain(tmp_path, timeout=0.5) < 3


def test_no_state_folder_means_nothing_to_drain(tmp_path: Path) -> None:
    assert ts.drain(tmp_path, timeout=10) == 0.0
