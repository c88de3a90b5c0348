"""Markdown every doc renderer shares (`ops.render_docs`): one table shape, one line for a result not committed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def md_table(header: Iterable[Any], rows: Iterable[Iterable[Any]]) -> str:
    """A Markdown table: the header row, the separator, one line per row (each cell as ``str`` gives it)."""
    header = [str(h) for h in header]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def not_kept(what: str, command: str, result: str) -> str:
    """The line a generated block shows while its result is not committed."""
    return (
        f"Not measured any more: the figures of {what} once quoted here came from runs whose results were not "
        f"kept. `{command}` measures it again and renders its result (`docs/results/{result}`) here; commit "
        "the result with the page.\n"
    )
