"""The gateway's spool on disk: what was acknowledged is never lost, and each instance is graded once.

One file per SOP Instance UID under ``incoming/``, ``answers/``, ``done/`` and ``failed/``; every write
goes to ``tmp/``, is fsynced and renamed into place, so a crash leaves the whole file or none.
docs/PACS.md ("Nothing lost") gives the layout.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from gateway.screen import is_valid_uid

__all__ = ["Spool"]

log = logging.getLogger(__name__)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """The queue of received instances and the record of finished ones (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.incoming = self.root / "incoming"
        self.answers = self.root / "answers"
        self.done = self.root / "done"
        self.failed = self.root / "failed"
        self.tmp = self.root / "tmp"
        for folder in (self.incoming, self.answers, self.done, self.failed, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        for stale in self.tmp.iterdir():  # half-written by a killed gateway: never acknowledged
            stale.unlink(missing_ok=True)

    @staticmethod
    def _check(uid: str) -> str:
        if not is_valid_uid(uid):
            raise ValueError(f"not a DICOM UID (digits and dots, at most 64 characters): {uid!r}")
        return uid

    def _write(self, path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.tmp, prefix=path.name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

    def put(self, uid: str, data: bytes) -> bool:
        """Queue an instance (its whole Part 10 file); False when that instance is already done (a duplicate).

        Raises:
            ValueError: ``uid`` is not a DICOM UID.
            OSError: the disk refused it; the sender must be told (the C-STORE fails).
        """
        if self.is_done(uid):
            return False
        self._write(self.incoming / f"{self._check(uid)}.dcm", data)
        return True

    def pending(self) -> list[Path]:
        """The queued instances, oldest first."""
        files = [p for p in self.incoming.glob("*.dcm") if p.is_file()]
        return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))

    def is_done(self, uid: str) -> bool:
        return (self.done / f"{self._check(uid)}.json").is_file()

    def done_record(self, uid: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.done / f"{self._check(uid)}.json").read_text())
        except FileNotFoundError:
            return None

    def save_answer(self, uid: str, answer: dict[str, Any]) -> None:
        self._write(self.answers / f"{self._check(uid)}.json", json.dumps(answer).encode())

    def load_answer(self, uid: str) -> dict[str, Any] | None:
        """The answer saved by an earlier attempt (e.g. before a crash or a PACS outage), or None."""
        path = self.answers / f"{self._check(uid)}.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            log.warning("unreadable saved answer %s: asking the server again", path)
            return None

    def mark_done(self, uid: str, record: dict[str, Any]) -> None:
        """Record the instance as finished, then drop it from the queue (in this order: a crash in between
        leaves a done instance in the queue, which the gateway then only removes)."""
        self._write(self.done / f"{self._check(uid)}.json", json.dumps(record, sort_keys=True).encode())
        self.forget(uid)

    def forget(self, uid: str) -> None:
        """Remove the queued copy and the saved answer of an instance that is done."""
        (self.incoming / f"{self._check(uid)}.dcm").unlink(missing_ok=True)
        (self.answers / f"{uid}.json").unlink(missing_ok=True)

    def park_failed(self, uid: str, record: dict[str, Any]) -> Path:
        """Move a queued instance out of the queue into ``failed/`` (kept, never deleted), with why."""
        self._write(self.failed / f"{self._check(uid)}.json", json.dumps(record, sort_keys=True).encode())
        target = self.failed / f"{uid}.dcm"
        source = self.incoming / f"{uid}.dcm"
        if source.exists():
            shutil.move(source, target)
            _fsync_dir(self.failed)
        (self.answers / f"{uid}.json").unlink(missing_ok=True)
        return target

    def requeue_failed(self) -> int:
        """Put every instance of ``failed/`` back into the queue (after the cause was fixed); returns how many."""
        count = 0
        for path in sorted(self.failed.glob("*.dcm")):
            os.replace(path, self.incoming / path.name)
            (self.failed / f"{path.stem}.json").unlink(missing_ok=True)
            count += 1
        if count:
            _fsync_dir(self.incoming)
        return count
