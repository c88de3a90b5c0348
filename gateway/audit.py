"""The gateway's audit log: one JSON object per line, appended and fsynced, never rewritten.

Each line has ``time``, ``event`` and the instance's UIDs, and the ``seq``/``prev`` hash chain of the
front door's audit trail (`ops.audit`), so ``python -m ops.audit verify pacs/data/audit.jsonl`` shows
that no line was edited or removed. docs/PACS.md ("The audit log") lists the events.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ops.audit import ChainWriter

__all__ = ["AuditLog", "read_audit"]


class AuditLog:
    """Append-only, hash-chained JSON-lines file (`ops.audit.ChainWriter`), safe to write from several threads."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._chain = ChainWriter(self.path)

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one line ``{"seq", "time", "event", **fields, "prev"}`` and sync it to disk; returns the record."""
        record = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), "event": event, **fields}
        # JSON-safe first (UIDs, paths), as the gateway always wrote them.
        return self._chain.append(json.loads(json.dumps(record, default=str)))


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
