"""The gateway's audit log: one JSON object per line, appended and fsynced, never rewritten.

Each line has ``time`` (UTC, ISO 8601), ``event`` and the UIDs of the instance concerned. Events:

    received   an instance was spooled and its C-STORE acknowledged (calling AE)
    duplicate  an instance already done arrived again: acknowledged, not graded again
    result     graded: kl_grade, probabilities, oa_probability, uncertain, model, stored SOP UIDs, timings
    refused    no grade: kind, reason (the server's or the gateway's words), by (server or gateway), stored SR
    skipped    not a radiograph to grade (an SR, a secondary capture, another modality): nothing stored
    failed     the server failed on it repeatedly: moved to the spool's failed/ folder
    retry      a transient failure (server or PACS unreachable, restarting): it stays queued

A gateway killed between storing the results and recording them finishes the instance again when it
resumes: the same results (same UIDs) are stored once more, which the PACS ignores, and the log holds
a second ``result`` line for it, marked ``"resumed": true``.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["AuditLog", "read_audit"]


class AuditLog:
    """Append-only JSON-lines file, safe to write from several threads."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one line ``{"time", "event", **fields}`` and sync it to disk; returns the record."""
        record = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), "event": event, **fields}
        line = json.dumps(record, default=str) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        return record


def read_audit(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record of an audit log (a torn last line, from a crash while writing it, is left out)."""
    records = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records
