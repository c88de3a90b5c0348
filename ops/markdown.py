"""The Markdown table every doc renderer draws (`ops.render_docs`), so the pages' tables have one shape."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def md_table(header: Iterable[Any], rows: Iterable[Iterable[Any]]) -> str:
    """A Markdown table: the header row, the separator, one line per row (each cell as ``str`` gives it)."""
    header = [str(h) for h in header]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
